"""Content ids of uploaded images: what the gateway, the encoder and the cache key on.

Kept apart from `images.py` (which decodes pixels with Pillow) so the gateway can hash and check ids
without the imaging stack.
"""

from __future__ import annotations

import hashlib
import re

from .errors import InvalidRequest


def image_id(data: bytes) -> str:
    """Content id of the uploaded bytes: lowercase hex sha256 (what clients may re-use across models)."""
    return hashlib.sha256(data).hexdigest()


_IMAGE_ID = re.compile(r"[0-9a-f]{64}")


def check_image_id(value: str) -> str:
    """`value` if it has the form of an `image_id`, else InvalidRequest."""
    if not _IMAGE_ID.fullmatch(value):
        raise InvalidRequest(f"image_id must be 64 lowercase hex digits (sha256 of the image bytes), got {value[:80]!r}")
    return value


def scoped_image_id(scope: str, image_id: str) -> str:
    """The id an image has inside vlsplit (cache keys, stored bytes, decoder prefixes, payloads): its
    content id when unscoped, else a hash of the scope and the content id, so a tenant holding another
    tenant's image id reaches nothing of theirs. The form of an image id either way."""
    if not scope:
        return image_id
    return hashlib.sha256(f"vlsplit-scope\0{scope}\0{image_id}".encode()).hexdigest()
