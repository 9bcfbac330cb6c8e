"""An image's width and height from its first bytes, without decoding it or importing Pillow (the
gateway has neither), and the tokens Qwen's processor makes of it: what the gateway needs to estimate
a request's embedding payloads before any image is encoded.

PNG, JPEG, GIF, WebP and BMP; anything else (or a truncated header) is None: the caller then assumes
the smallest image, so an estimate never refuses what the encoder and decoder would take.
"""

from __future__ import annotations

import math
import struct


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header, or None when it is not one we read."""
    try:
        for magic, reader in READERS:
            if data.startswith(magic):
                size = reader(data)
                return size if size and size[0] > 0 and size[1] > 0 else None
    except (struct.error, IndexError):
        return None
    return None


def _png(data: bytes) -> tuple[int, int]:
    return struct.unpack(">II", data[16:24])


def _gif(data: bytes) -> tuple[int, int]:
    return struct.unpack("<HH", data[6:10])


def _bmp(data: bytes) -> tuple[int, int]:
    width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height)


def _webp(data: bytes) -> tuple[int, int] | None:
    if data[8:12] != b"WEBP":
        return None
    kind = data[12:16]
    if kind == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if kind == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X":
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def _jpeg(data: bytes) -> tuple[int, int] | None:
    """The first start-of-frame marker's size (segments walked by their lengths)."""
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    return None


READERS = ((b"\x89PNG\r\n\x1a\n", _png), (b"\xff\xd8", _jpeg), (b"GIF87a", _gif), (b"GIF89a", _gif),
           (b"RIFF", _webp), (b"BM", _bmp))


def image_tokens(size: tuple[int, int] | None, patch_size: int, merge_size: int, min_pixels: int,
                 max_pixels: int) -> int:
    """Tokens of an image of `size` (width, height) after Qwen's smart_resize; None -> the smallest image's."""
    factor = patch_size * merge_size
    if size is None:
        return max(1, math.ceil(min_pixels / factor**2))
    width, height = size
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar * w_bar // factor**2


def grid_tokens(grid_thw: tuple[int, int, int], merge_size: int) -> int:
    """Tokens the tower makes of a patch grid (t, h, w): each merge_size x merge_size block is one."""
    t, h, w = grid_thw
    return t * h * w // merge_size**2
