"""Qwen2.5-VL: window-attention ViT with SwiGLU and RMSNorm, Qwen2.5 language model, M-RoPE."""

from __future__ import annotations

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLTextModel,
)

from .base import Family, Widths
from .qwen2_vl import PREPROCESSOR as QWEN2_VL_PREPROCESSOR
from .qwen2_vl import VIDEO
from .qwen2_vl import legacy_text_config

PREPROCESSOR = {**QWEN2_VL_PREPROCESSOR, "processor_class": "Qwen2_5_VLProcessor"}


def hub_config(w: Widths, ids: dict[str, int], vocab_size: int) -> dict:
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        **legacy_text_config(w, ids, vocab_size),
        "vision_config": {"hidden_act": "silu", "in_chans": 3, "patch_size": 14, "spatial_patch_size": 14,
                          "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                          "tokens_per_second": 2, **w.vision},
    }


SIZES = {
    "tiny": Widths(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128000, mrope_section=[2, 3, 3]),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    fullatt_block_indexes=[1]),
    ),
    # Qwen2.5-VL-3B widths, few layers (one window-attention and one full-attention block pair).
    "bench": Widths(
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=2, max_position_embeddings=128000, mrope_section=[16, 24, 24]),
        vision=dict(depth=4, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                    fullatt_block_indexes=[1, 3]),
    ),
}

FAMILY = Family(
    model_type="qwen2_5_vl",
    config_class=Qwen2_5_VLConfig,
    model_class=Qwen2_5_VLForConditionalGeneration,
    vision_class=Qwen2_5_VisionTransformerPretrainedModel,
    text_class=Qwen2_5_VLTextModel,
    has_deepstack=False,
    preprocessor=PREPROCESSOR,
    hub_config=hub_config,
    sizes=SIZES,
    video=VIDEO,
    video_prompt="seconds",
)
