"""Qwen3-VL: ViT with learned+interpolated position embeddings and DeepStack features that are added
to the first decoder layers' hidden states at image positions; interleaved M-RoPE."""

from __future__ import annotations

from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel, Qwen3VLVisionModel

from ..video import VideoRule
from .base import Family, Widths, token_fields

PREPROCESSOR = {
    "min_pixels": 65536,
    "max_pixels": 16777216,
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen3VLProcessor",
}

# Qwen3VLVideoProcessor's values: its pixel bounds are over all frames; max_video_tokens caps one frame.
VIDEO = VideoRule("qwen3", {
    "fps": 2.0, "min_frames": 4, "max_frames": 768,
    "size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32},
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "max_video_tokens": 768,
    "video_processor_type": "Qwen3VLVideoProcessor", "do_sample_frames": True, "cap_pixels_per_frame": True,
})


def hub_config(w: Widths, ids: dict[str, int], vocab_size: int) -> dict:
    text = {k: v for k, v in w.text.items() if k != "mrope_section"}
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "tie_word_embeddings": True,
        **token_fields(ids),
        "text_config": {
            "model_type": "qwen3_vl_text",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "rms_norm_eps": 1e-6,
            "rope_theta": 5000000,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": w.text["mrope_section"],
                             "rope_type": "default"},
            "tie_word_embeddings": True,
            "use_cache": True,
            "vocab_size": vocab_size,
            **text,
        },
        "vision_config": {"model_type": "qwen3_vl", "hidden_act": "gelu_pytorch_tanh", "in_channels": 3,
                          "initializer_range": 0.02, "patch_size": 16, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "num_position_embeddings": 2304, **w.vision},
    }


SIZES = {
    "tiny": Widths(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=262144, mrope_section=[2, 3, 3]),
        vision=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    deepstack_visual_indexes=[0, 1, 2]),
    ),
    # Qwen3-VL-2B widths, few layers; three DeepStack levels as in the real model.
    "bench": Widths(
        text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                  mrope_section=[24, 20, 20]),
        vision=dict(depth=4, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                    deepstack_visual_indexes=[1, 2, 3]),
    ),
}

FAMILY = Family(
    model_type="qwen3_vl",
    config_class=Qwen3VLConfig,
    model_class=Qwen3VLForConditionalGeneration,
    vision_class=Qwen3VLVisionModel,
    text_class=Qwen3VLTextModel,
    has_deepstack=True,
    preprocessor=PREPROCESSOR,
    hub_config=hub_config,
    sizes=SIZES,
    video=VIDEO,
    video_prompt="timestamps",
)
