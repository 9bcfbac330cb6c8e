"""Vision tower engine: loads ONLY the visual weights and turns images into embedding payloads.

No grpc here; the servicer wraps it. The tower is the family's own transformers vision module,
so its numerics are exactly those of the monolithic model.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from PIL import Image
from transformers.initialization import no_init_weights

from shared.checkpoint import Checkpoint, load_strict
from shared.fingerprint import compute_fingerprint
from shared.payload import EmbeddingPayload
from shared.processor import ImageInputs, ImagePreprocessor
from shared.quantize import check_quantize, quantize_linears, resident_bytes

from .fast_ops import fuse_mlp_activations, use_fast_rotary, use_linear_patch_embed

log = logging.getLogger("vlsplit.vision")


class VisionEngine:
    def __init__(
        self,
        checkpoint: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        attn_implementation: str = "sdpa",
        quantize: str = "off",
    ):
        start = time.perf_counter()
        self.checkpoint = Checkpoint(checkpoint)
        self.family = self.checkpoint.family
        self.dtype, self.device = dtype, torch.device(device)
        config = self.checkpoint.config.vision_config
        config._attn_implementation = attn_implementation
        with no_init_weights():
            tower = self.family.vision_class._from_config(config, dtype=torch.float32)
        load_strict(tower, self.checkpoint.read(self.checkpoint.visual_names(), dtype))
        use_linear_patch_embed(tower)  # fast_ops.py: the patchify Conv3d as the linear it is
        use_fast_rotary(tower)  # the same rotary embedding in fewer passes (bit-identical)
        check_quantize(quantize)
        if quantize == "int8":  # shared/quantize.py: every linear of the blocks and the merger
            quantize_linears(tower)
        self.tower = tower.eval().to(self.device)
        self.fused_activations = fuse_mlp_activations(self.tower, dtype)  # bf16: activations fused into the GEMMs
        self.quantize = quantize
        self.preprocessor = ImagePreprocessor.from_pretrained(self.checkpoint.path)
        self.fingerprint = compute_fingerprint(self.checkpoint.path)
        log.info(
            "vision tower %s loaded in %.2fs (%s, %s, fingerprint %s)",
            self.family.model_type, time.perf_counter() - start, dtype, device, self.fingerprint,
        )

    def weight_bytes(self) -> int:
        return resident_bytes(self.tower)

    def preprocess(self, images: list[Image.Image]) -> list[ImageInputs]:
        return [self.preprocessor(image) for image in images]

    @torch.inference_mode()
    def encode(self, images: list[Image.Image]) -> list[EmbeddingPayload]:
        """One payload per image; all images go through the tower in one forward pass."""
        return self.encode_inputs(self.preprocess(images))

    @torch.inference_mode()
    def encode_inputs(self, inputs: list[ImageInputs]) -> list[EmbeddingPayload]:
        pixel_values = torch.cat([i.pixel_values for i in inputs]).to(self.device, self.dtype)
        grid_thw = torch.tensor([i.grid_thw for i in inputs], device=self.device)
        out = self.tower(pixel_values, grid_thw=grid_thw)
        sizes = [self.tokens_per_image(i.grid_thw) for i in inputs]
        embeddings = out.pooler_output.split(sizes)  # each [n_tokens_i, hidden]
        # Qwen3-VL: L levels, each [sum n_tokens, hidden] -> per image L x [n_tokens_i, hidden]
        levels = [level.split(sizes) for level in getattr(out, "deepstack_features", None) or []]
        return [
            EmbeddingPayload(
                embeddings=embeddings[k].cpu().contiguous(),
                grid_thw=inputs[k].grid_thw,
                fingerprint=self.fingerprint,
                deepstack=tuple(level[k].cpu().contiguous() for level in levels),
            )
            for k in range(len(inputs))
        ]

    def tokens_per_image(self, grid_thw: tuple[int, int, int]) -> int:
        t, h, w = grid_thw
        return t * h * w // self.preprocessor.merge_size**2
