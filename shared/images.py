"""Untrusted upload bytes -> a validated, fully decoded RGB `PIL.Image.Image`.

The output feeds a Qwen-VL image processor, so for an ordinary 8-bit image it is exactly what
`transformers.image_utils.load_image` gives: `ImageOps.exif_transpose` then `convert("RGB")`.
Decisions where we differ from, or go beyond, that reference:

- Alpha is dropped, not composited (RGBA, LA, P with transparency): `convert("RGB")` keeps the
  colour under a transparent pixel, exactly as the reference does, so embeddings match it.
- 16-bit grayscale (I;16, I;16B, I) keeps its top 8 bits (`value >> 8`); PIL's own
  `convert("RGB")` clips every value above 255, which turns such images white.
- Animated GIF/WebP/APNG (and multi-picture JPEG): the first frame only.
- Only common raster formats are opened (`ALLOWED_FORMATS`); PIL's EPS plugin, for one, would
  hand untrusted bytes to Ghostscript.
- Size limits are checked from the header before a pixel is decoded, and PIL's own
  decompression-bomb guard (`Image.MAX_IMAGE_PIXELS`) stays armed, raised to an error, so the
  effective pixel limit is the smaller of ours and PIL's.

Every failure is a `BadImage` or `TooLarge`; no PIL exception escapes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadImage, TooLarge

MiB = 1 << 20

# JPEG covers multi-picture (MPO) files from phones: PIL opens them through the JPEG plugin.
ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")

# Modes holding more than 8 bits of gray; "I" is how some decoders (TIFF, PPM) deliver 16-bit.
_WIDE_GRAY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


@dataclass(frozen=True)
class ImageLimits:
    """Upper bounds for one uploaded image. Pixel limits apply to the decoded width x height."""

    max_bytes: int = 32 * MiB
    max_pixels: int = 8192 * 8192
    max_side: int = 16384


def load_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode `data` into a loaded RGB image, or raise `BadImage` / `TooLarge`."""
    _check_byte_size(data, limits)
    # catch_warnings swaps the process-wide filter list, so a thread racing us may briefly see
    # our filter or lose it; harmless, since our own header check below is the primary guard.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(BytesIO(data), formats=ALLOWED_FORMATS) as im:
                _check_dimensions(im.size, limits)
                return _decode_rgb(im)
        except (BadImage, TooLarge):
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise TooLarge(
                f"image rejected before decoding: {exc} (our limit is {limits.max_pixels} pixels)"
            ) from exc
        except UnidentifiedImageError as exc:
            raise BadImage(
                f"not an image in a supported format ({', '.join(ALLOWED_FORMATS)}): "
                f"{len(data)} bytes starting {data[:8]!r}"
            ) from exc
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
            raise BadImage(f"cannot decode image: {type(exc).__name__}: {exc}") from exc


def _check_byte_size(data: bytes, limits: ImageLimits) -> None:
    if not data:
        raise BadImage("empty image: 0 bytes")
    if len(data) > limits.max_bytes:
        raise TooLarge(f"image is {len(data)} bytes; the limit is {limits.max_bytes} bytes")


def _check_dimensions(size: tuple[int, int], limits: ImageLimits) -> None:
    """Reject from the header alone: `Image.open` has read only that much so far."""
    width, height = size
    if width < 1 or height < 1:
        raise BadImage(f"image has no pixels: {width}x{height}")
    if width * height > limits.max_pixels:
        raise TooLarge(
            f"image is {width}x{height} = {width * height} pixels; "
            f"the limit is {limits.max_pixels} pixels"
        )
    if max(width, height) > limits.max_side:
        raise TooLarge(
            f"image is {width}x{height}; the limit is {limits.max_side} pixels per side"
        )


def _decode_rgb(im: Image.Image) -> Image.Image:
    """Decode the current (first) frame, apply EXIF orientation, convert to RGB."""
    im.load()  # truncated or corrupt data fails here, inside the caller's error mapping
    ImageOps.exif_transpose(im, in_place=True)  # in place: spares a full copy of the pixels
    if im.mode in _WIDE_GRAY_MODES:
        return _wide_gray_to_l(im).convert("RGB")
    # convert() returns a new in-memory image even for RGB, detached from the closed file.
    return im.convert("RGB")


def _wide_gray_to_l(im: Image.Image) -> Image.Image:
    """16-bit gray -> 8-bit gray by keeping the high byte (65535 -> 255, 32768 -> 128)."""
    pixels = np.asarray(im).astype(np.int64)  # [h, w]; source dtype may be <u2, >u2 or int32
    high_byte = np.clip(pixels, 0, 0xFFFF) >> 8
    return Image.fromarray(high_byte.astype(np.uint8))
