"""Qwen2-VL: ViT with 2-D RoPE and a patch merger, Qwen2 language model, M-RoPE."""

from __future__ import annotations

from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VisionTransformerPretrainedModel,
    Qwen2VLTextModel,
)

from ..video import VideoRule
from .base import Family, Widths, token_fields

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

PREPROCESSOR = {
    "min_pixels": 56 * 56,
    "max_pixels": 28 * 28 * 16384,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}

# Qwen2VLVideoProcessor's values (Qwen2-VL and Qwen2.5-VL checkpoints ship these), sampling at
# qwen-vl-utils' 2 frames a second; max_video_tokens is the context its total pixel budget assumes.
VIDEO = VideoRule("qwen2", {
    "fps": 2.0, "min_frames": 4, "max_frames": 768,
    "size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28},
    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD, "max_video_tokens": 128000,
    "video_processor_type": "Qwen2VLVideoProcessor", "do_sample_frames": True, "cap_pixels_per_frame": True,
})


def legacy_text_config(w: Widths, ids: dict[str, int], vocab_size: int) -> dict:
    """Top-level text fields as in the hub's Qwen2-VL / Qwen2.5-VL config.json."""
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": w.text["num_hidden_layers"],
        "attention_dropout": 0.0,
        "vocab_size": vocab_size,
        "tie_word_embeddings": True,
        **{k: v for k, v in w.text.items() if k != "mrope_section"},
        "rope_scaling": {"type": "mrope", "mrope_section": w.text["mrope_section"]},
        **token_fields(ids),
    }


def hub_config(w: Widths, ids: dict[str, int], vocab_size: int) -> dict:
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        **legacy_text_config(w, ids, vocab_size),
        "vision_config": {"in_chans": 3, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, **w.vision},
    }


SIZES = {
    "tiny": Widths(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32768, mrope_section=[2, 3, 3]),
        vision=dict(depth=2, embed_dim=32, mlp_ratio=2, num_heads=2, hidden_size=64),
    ),
    # Qwen2-VL-2B widths, few layers.
    "bench": Widths(
        text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=4, num_attention_heads=12,
                  num_key_value_heads=2, max_position_embeddings=32768, mrope_section=[16, 24, 24]),
        vision=dict(depth=4, embed_dim=1280, mlp_ratio=4, num_heads=16, hidden_size=1536),
    ),
}

FAMILY = Family(
    model_type="qwen2_vl",
    config_class=Qwen2VLConfig,
    model_class=Qwen2VLForConditionalGeneration,
    vision_class=Qwen2VisionTransformerPretrainedModel,
    text_class=Qwen2VLTextModel,
    has_deepstack=False,
    preprocessor=PREPROCESSOR,
    hub_config=hub_config,
    sizes=SIZES,
    video=VIDEO,
    video_prompt="flat",
)
