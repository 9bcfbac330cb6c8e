"""The embedding payload: what the vision encoder produces for one image and the decoder consumes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VideoTiming:
    """What the decoder needs of a clip beyond its grid (shared/video.py says how it is derived):
    second_per_grid_t spaces Qwen2.5-VL's temporal positions, timestamps (seconds, one per temporal
    patch) are the `<t seconds>` text Qwen3-VL's prompt puts before each frame."""

    second_per_grid_t: float
    timestamps: tuple[float, ...]


@dataclass(frozen=True)
class EmbeddingPayload:
    """Vision-tower output for ONE image, ready to be scattered into a prompt.

    embeddings: [n_tokens, hidden]   merged patch embeddings, n_tokens = t*h*w / merge**2
    grid_thw:   (t, h, w)            patch grid BEFORE the spatial merge (what M-RoPE needs)
    deepstack:  L x [n_tokens, hidden] Qwen3-VL deepstack features, empty for Qwen2/2.5-VL
    fingerprint: the producing model's fingerprint (see shared/fingerprint.py)
    image_id:  content id (sha256 of the image bytes) of the image it belongs to; "" if unnamed
               (for a clip: its media id, which covers the sampling too: shared/image_ids.py)
    video:     a clip's timing (shared/video.py), None for an image
    """

    embeddings: torch.Tensor
    grid_thw: tuple[int, int, int]
    fingerprint: str
    deepstack: tuple[torch.Tensor, ...] = ()
    image_id: str = ""
    video: VideoTiming | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.dtype

    def to(self, dtype: torch.dtype) -> "EmbeddingPayload":
        """Same payload with every tensor cast to `dtype`."""
        return EmbeddingPayload(
            embeddings=self.embeddings.to(dtype),
            grid_thw=self.grid_thw,
            fingerprint=self.fingerprint,
            deepstack=tuple(t.to(dtype) for t in self.deepstack),
            image_id=self.image_id,
            video=self.video,
        )

    def named(self, image_id: str) -> "EmbeddingPayload":
        """Same payload, naming its image."""
        return dataclasses.replace(self, image_id=image_id)
