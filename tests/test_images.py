"""shared/images.py: every bad upload is a typed error, every mode comes back as the right RGB."""

from __future__ import annotations

import hashlib
import struct
import warnings
import zlib
from io import BytesIO

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from shared.errors import BadImage, TooLarge
from shared.image_ids import image_id
from shared.images import MiB, ImageLimits, load_image

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def encode(im: Image.Image, fmt: str, **params) -> bytes:
    buf = BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def handmade_png(width: int, height: int, idat: bytes = zlib.compress(b"")) -> bytes:
    """A PNG whose IHDR claims width x height (8-bit RGB) but whose IDAT holds almost nothing."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any pixel data is decoded: proves a rejection came from the header."""
    def refuse(self):
        raise AssertionError("pixels were decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def rgb(im: Image.Image) -> np.ndarray:
    assert im.mode == "RGB"
    return np.asarray(im)


# --- bad input -----------------------------------------------------------------------------

def test_empty_bytes_are_bad_image():
    with pytest.raises(BadImage, match="empty image: 0 bytes"):
        load_image(b"")


def test_non_image_bytes_are_bad_image():
    with pytest.raises(BadImage, match="not an image in a supported format"):
        load_image(b"%PDF-1.7 definitely not a picture")


def test_unsupported_format_is_refused():
    # PIL can read EPS (via Ghostscript), but untrusted bytes never reach that plugin.
    with pytest.raises(BadImage, match="not an image in a supported format"):
        load_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")


def test_oversize_byte_string_is_too_large():
    with pytest.raises(TooLarge, match=f"the limit is {32 * MiB} bytes"):
        load_image(b"\0" * (32 * MiB + 1))
    with pytest.raises(TooLarge, match="image is 2000 bytes; the limit is 1000 bytes"):
        load_image(b"\0" * 2000, ImageLimits(max_bytes=1000))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_bad_image(fmt):
    data = encode(noise((64, 64)), fmt)
    with pytest.raises(BadImage, match="cannot decode image"):
        load_image(data[: len(data) * 2 // 3])


def test_corrupt_png_chunk_is_bad_image():
    data = bytearray(encode(noise((16, 16)), "PNG"))
    data[-20] ^= 0xFF  # flips a byte inside IDAT, so its CRC no longer matches
    with pytest.raises(BadImage, match="cannot decode image"):
        load_image(bytes(data))


def test_decompression_bomb_is_rejected_from_header(no_decoding):
    bomb = handmade_png(50_000, 50_000)
    assert len(bomb) < 100
    with pytest.raises(TooLarge, match="2500000000 pixels"):
        load_image(bomb)


def test_pil_bomb_guard_stays_armed_under_a_looser_limit(no_decoding):
    # 10000 x 10000 is over PIL's warning threshold; that warning is an error inside load_image.
    with pytest.raises(TooLarge, match="100000000 pixels"):
        load_image(handmade_png(10_000, 10_000), ImageLimits(max_pixels=200_000_000))


def test_over_our_pixel_limit_is_rejected_from_header(no_decoding):
    # 9000 x 9000 passes PIL's own bomb guard (89.5 Mpx) but not our 8192 x 8192 default.
    expected = f"image is 9000x9000 = 81000000 pixels; the limit is {8192 * 8192} pixels"
    with pytest.raises(TooLarge, match=expected):
        load_image(handmade_png(9000, 9000))


def test_over_side_limit_is_rejected_from_header(no_decoding):
    with pytest.raises(TooLarge, match="image is 20000x10; the limit is 16384 pixels per side"):
        load_image(handmade_png(20_000, 10))


def test_custom_pixel_limit_names_the_limit():
    with pytest.raises(TooLarge, match="image is 20x20 = 400 pixels; the limit is 100 pixels"):
        load_image(encode(noise((20, 20)), "PNG"), ImageLimits(max_pixels=100))


def test_global_pil_state_is_untouched():
    filters = list(warnings.filters)
    with pytest.raises(TooLarge):
        load_image(handmade_png(50_000, 50_000))
    with pytest.raises(BadImage):
        load_image(encode(noise((64, 64)), "PNG")[:500])
    assert Image.MAX_IMAGE_PIXELS == 89_478_485
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert warnings.filters == filters


# --- good input ----------------------------------------------------------------------------

def test_rgb_png_comes_back_pixel_identical():
    original = noise((33, 17))
    out = load_image(encode(original, "PNG"))
    assert out.size == (33, 17)
    np.testing.assert_array_equal(rgb(out), np.asarray(original))


@pytest.mark.parametrize("mode, fmt", [("RGB", "PNG"), ("RGB", "JPEG"), ("RGBA", "PNG"),
                                       ("L", "PNG"), ("P", "GIF")])
def test_matches_transformers_load_image(mode, fmt):
    """Our pixels are what the monolithic reference feeds its image processor."""
    image_utils = pytest.importorskip("transformers.image_utils")
    data = encode(noise((24, 16)).convert(mode), fmt)
    reference = image_utils.load_image(Image.open(BytesIO(data))).convert("RGB")
    np.testing.assert_array_equal(rgb(load_image(data)), np.asarray(reference))


@pytest.mark.parametrize("fmt, params", [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True})])
def test_animated_image_uses_first_frame(fmt, params):
    frames = [Image.new("RGB", (8, 6), colour) for colour in (RED, GREEN, BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, **params)
    assert Image.open(BytesIO(data)).n_frames == 3
    out = load_image(data)
    assert out.size == (8, 6)
    assert out.getpixel((4, 3)) == RED


def test_cmyk_jpeg_becomes_rgb():
    out = load_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95))
    r, g, b = out.getpixel((4, 4))
    assert r > 230 and g < 30 and b < 30


def test_palette_png_becomes_rgb():
    im = Image.new("P", (4, 4), 1)
    im.putpalette([*RED, *GREEN, *BLUE])
    assert load_image(encode(im, "PNG")).getpixel((0, 0)) == GREEN


def test_palette_png_with_transparency_drops_alpha():
    im = Image.new("P", (4, 4), 1)
    im.putpalette([*RED, *GREEN, *BLUE])
    data = encode(im, "PNG", transparency=1)  # index 1 (green) fully transparent
    assert Image.open(BytesIO(data)).info["transparency"] == 1
    assert load_image(data).getpixel((0, 0)) == GREEN


def test_rgba_drops_alpha_keeping_colour():
    out = load_image(encode(Image.new("RGBA", (4, 4), (10, 20, 30, 0)), "PNG"))
    assert out.getpixel((1, 1)) == (10, 20, 30)


@pytest.mark.parametrize("mode, value, expected", [("L", 77, 77), ("LA", (200, 0), 200),
                                                   ("1", 1, 255), ("1", 0, 0)])
def test_gray_modes_become_gray_rgb(mode, value, expected):
    data = encode(Image.new(mode, (4, 4), value), "PNG")
    assert Image.open(BytesIO(data)).mode == mode
    assert load_image(data).getpixel((2, 2)) == (expected,) * 3


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("I;16B", "TIFF"), ("I", "TIFF")])
def test_16_bit_gray_is_scaled_not_clipped(mode, fmt):
    im = Image.new(mode, (4, 1))
    for x, v in enumerate((0, 255, 32768, 65535)):
        im.putpixel((x, 0), v)
    data = encode(im, fmt)
    assert Image.open(BytesIO(data)).mode == mode
    out = load_image(data)
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [0, 0, 128, 255]
    assert len(set(out.getpixel((2, 0)))) == 1  # gray: r == g == b


@pytest.mark.parametrize("orientation, size", [(6, (6, 10)), (8, (6, 10)), (3, (10, 6))])
def test_exif_orientation_is_applied(orientation, size):
    im = Image.new("RGB", (10, 6), BLUE)
    im.paste(RED, (0, 0, 5, 3))  # a red top-left quadrant shows which way it turned
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(im, "JPEG", quality=95, exif=exif)
    out = load_image(data)
    assert out.size == size
    expected = ImageOps.exif_transpose(Image.open(BytesIO(data))).convert("RGB")
    np.testing.assert_array_equal(rgb(out), np.asarray(expected))


def test_output_is_loaded_and_detached():
    out = load_image(encode(noise((8, 8)), "PNG"))
    assert getattr(out, "fp", None) is None
    out.load()  # already in memory: nothing left to read


# --- image_id --------------------------------------------------------------------------------

def test_image_id_is_lowercase_sha256_hex():
    assert image_id(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    data = encode(noise((8, 8)), "PNG")
    assert image_id(data) == hashlib.sha256(data).hexdigest()
