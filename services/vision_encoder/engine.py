"""Vision tower engine: loads ONLY the visual weights and turns images into embedding payloads.

No grpc here; the servicer wraps it. The tower is the family's own transformers vision module,
so its numerics are exactly those of the monolithic model. Backend "openvino" runs the same weights
through a converted OpenVINO graph instead (openvino_backend.py), behind the same payloads.
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
from shared.image_size import grid_tokens
from shared.processor import ImageInputs, ImagePreprocessor
from shared.video import VideoInputs, VideoPreprocessor
from shared.quantize import check_quantize, quantize_linears, resident_bytes

from .fast_ops import fuse_mlp_activations, use_fast_rotary, use_linear_patch_embed

log = logging.getLogger("vlsplit.vision")

BACKENDS = ("torch", "openvino")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"VLSPLIT_ENCODER_BACKEND (--backend) {backend!r} is not one of {', '.join(BACKENDS)}")


class VisionEngine:
    def __init__(
        self,
        checkpoint: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        attn_implementation: str = "sdpa",
        quantize: str = "off",
        backend: str = "torch",
        openvino_cache_dir: str | Path | None = None,
    ):
        start = time.perf_counter()
        check_quantize(quantize)
        check_backend(backend)
        self.checkpoint = Checkpoint(checkpoint)
        self.family = self.checkpoint.family
        self.dtype, self.device = dtype, torch.device(device)
        self.checkpoint.config.vision_config._attn_implementation = attn_implementation
        self.quantize, self.backend = quantize, backend
        self.preprocessor = ImagePreprocessor.from_pretrained(self.checkpoint.path)
        self.video = VideoPreprocessor.from_pretrained(self.checkpoint.path, self.family.model_type)
        self.fingerprint = compute_fingerprint(self.checkpoint.path)
        self.openvino = None
        if backend == "openvino":
            self._open_openvino(openvino_cache_dir)
        else:
            self._open_torch()
        log.info(
            "vision tower %s loaded in %.2fs (%s, %s, %s, fingerprint %s)",
            self.family.model_type, time.perf_counter() - start, backend, dtype, device, self.fingerprint,
        )

    def _load_tower(self, dtype: torch.dtype, full: bool = True) -> torch.nn.Module:
        """The family's tower with the checkpoint's visual weights in `dtype` (only the ones outside
        openvino_backend.HEAVY_MODULES when not `full`: the rest then stays uninitialised)."""
        with no_init_weights():
            tower = self.family.vision_class._from_config(self.checkpoint.config.vision_config, dtype=torch.float32)
        names = self.checkpoint.visual_names()
        if full:
            load_strict(tower, self.checkpoint.read(names, dtype))
        else:
            from .openvino_backend import HEAVY_MODULES

            light = {k: v for k, v in names.items() if not v.startswith(tuple(f"{m}." for m in HEAVY_MODULES))}
            tower.load_state_dict(self.checkpoint.read(light, dtype), strict=False, assign=True)
        use_linear_patch_embed(tower)  # fast_ops.py: the patchify Conv3d as the linear it is
        return tower.eval()

    def _open_torch(self) -> None:
        tower = self._load_tower(self.dtype)
        use_fast_rotary(tower)  # the same rotary embedding in fewer passes (bit-identical)
        if self.quantize == "int8":  # shared/quantize.py: every linear of the blocks and the merger
            quantize_linears(tower)
        self.tower = tower.to(self.device)
        self.fused_activations = fuse_mlp_activations(self.tower, self.dtype)  # bf16: activations fused into the GEMMs

    def _open_openvino(self, cache_dir: str | Path | None) -> None:
        """The tower converted (float32 weights) or loaded from the IR cache; int8 through nncf."""
        from shared.config import openvino_cache_dir

        from .openvino_backend import open_tower

        if self.device.type != "cpu":
            raise ValueError("VLSPLIT_ENCODER_BACKEND=openvino runs on the CPU only (VLSPLIT_DEVICE=cpu)")
        self.openvino, self.tower = open_tower(
            lambda full: self._load_tower(torch.float32, full), self.fingerprint, self.dtype, self.quantize,
            Path(cache_dir) if cache_dir else openvino_cache_dir(), torch.get_num_threads())
        self.fused_activations = 0

    def backend_name(self) -> str:
        """For GetModelInfo: "torch", or "openvino <version>" (", nncf int8 weights" when compressed)."""
        if self.openvino is None:
            return "torch"
        return f"openvino {self.openvino.version}" + (", nncf int8 weights" if self.quantize == "int8" else "")

    def weight_bytes(self) -> int:
        return self.openvino.weight_bytes if self.openvino else resident_bytes(self.tower)

    def preprocess(self, images: list[Image.Image]) -> list[ImageInputs]:
        return [self.preprocessor(image) for image in images]

    @torch.inference_mode()
    def encode(self, images: list[Image.Image]) -> list[EmbeddingPayload]:
        """One payload per image; all images go through the tower in one forward pass."""
        return self.encode_inputs(self.preprocess(images))

    @torch.inference_mode()
    def encode_inputs(self, inputs: list[ImageInputs | VideoInputs]) -> list[EmbeddingPayload]:
        """One payload per image or clip (a clip is one item: its frames are the grid's t axis)."""
        pixel_values = torch.cat([i.pixel_values for i in inputs]).to(self.device, self.dtype)
        merged, deepstack = self.forward(pixel_values, [i.grid_thw for i in inputs])
        sizes = [self.tokens_per_image(i.grid_thw) for i in inputs]
        embeddings = merged.split(sizes)  # each [n_tokens_i, hidden]
        # Qwen3-VL: L levels, each [sum n_tokens, hidden] -> per image L x [n_tokens_i, hidden]
        levels = [level.split(sizes) for level in deepstack]
        return [
            EmbeddingPayload(
                embeddings=embeddings[k].cpu().contiguous(),
                grid_thw=inputs[k].grid_thw,
                fingerprint=self.fingerprint,
                deepstack=tuple(level[k].cpu().contiguous() for level in levels),
                video=getattr(inputs[k], "video", None),
            )
            for k in range(len(inputs))
        ]

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (merged tokens [sum n_tokens, hidden], deepstack levels [sum n_tokens, hidden] each), in self.dtype."""
        if self.openvino is not None:
            merged, levels = self.openvino(pixel_values, grids)
            return merged.to(self.dtype), [level.to(self.dtype) for level in levels]
        out = self.tower(pixel_values, grid_thw=torch.tensor(grids, device=self.device))
        return out.pooler_output, list(getattr(out, "deepstack_features", None) or [])

    def tokens_per_image(self, grid_thw: tuple[int, int, int]) -> int:
        return grid_tokens(grid_thw, self.preprocessor.merge_size)
