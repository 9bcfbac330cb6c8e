"""Content ids of uploaded images and clips: what the gateway, the encoder and the cache key on.

Kept apart from `images.py` (which decodes pixels with Pillow) so the gateway can hash and check ids
without the imaging stack.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

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


@dataclass(frozen=True)
class VideoParams:
    """A request's clip sampling as asked (0 = the model's default; shared/video.py resolves and bounds it)."""

    fps: float = 0.0
    min_frames: int = 0
    max_frames: int = 0
    min_pixels: int = 0
    max_pixels: int = 0

    @classmethod
    def from_pb(cls, pb) -> "VideoParams":
        if not (math.isfinite(pb.fps) and pb.fps >= 0):
            raise InvalidRequest(f"video fps must be a finite number >= 0, got {pb.fps}")
        return cls(float(pb.fps), int(pb.min_frames), int(pb.max_frames), int(pb.min_pixels), int(pb.max_pixels))

    def to_pb(self, pb) -> None:
        pb.fps, pb.min_frames, pb.max_frames = self.fps, self.min_frames, self.max_frames
        pb.min_pixels, pb.max_pixels = self.min_pixels, self.max_pixels

    def key(self) -> str:
        return (f"fps={self.fps:g};frames={self.min_frames}-{self.max_frames};"
                f"pixels={self.min_pixels}-{self.max_pixels}")


def video_media_id(content_id: str, params: VideoParams) -> str:
    """The id a clip has inside vlsplit for one sampling (cache key, decoder prefix, payload, routing):
    the same bytes sampled otherwise are another entry. The form of an image id."""
    return hashlib.sha256(f"vlsplit-video\0{content_id}\0{params.key()}".encode()).hexdigest()
