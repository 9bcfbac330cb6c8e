"""What the rest of the code needs to know about one Qwen-VL model family.

One small module per family fills in a `Family`; `shared.families.get_family(model_type)` looks it
up. Nothing else in the code branches on `model_type`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# Prefixes under which checkpoints store tensors. Hub Qwen2/2.5-VL checkpoints use the legacy
# layout (`visual.*`, `model.*`); Qwen3-VL and transformers-5 saves use the nested one.
VISUAL_PREFIXES = ("model.visual.", "visual.")
LANGUAGE_PREFIXES = ("model.language_model.", "model.")
LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class Widths:
    """The sizes `make-model` needs for one family at one size (tiny or bench)."""

    text: dict[str, Any]
    vision: dict[str, Any]


@dataclass(frozen=True)
class Family:
    model_type: str
    config_class: type
    model_class: type  # monolithic *ForConditionalGeneration: the equivalence reference
    vision_class: type  # vision tower alone: takes (pixel_values, grid_thw)
    text_class: type  # language model alone (no lm_head)
    has_deepstack: bool
    # Published image-processor values of the family's checkpoints (preprocessor_config.json).
    preprocessor: dict[str, Any]
    # Builds a hub-style config.json dict from widths and the tokenizer's special-token ids.
    hub_config: Callable[[Widths, dict[str, int], int], dict[str, Any]]
    sizes: dict[str, Widths] = field(default_factory=dict)
    # Video: which processing rule (shared/video.py) and the published video-processor values
    # (video_preprocessor_config.json); how the decoder places a clip (prompt and M-RoPE):
    # "flat" (Qwen2-VL), "seconds" (Qwen2.5-VL: temporal positions spaced by second_per_grid_t),
    # "timestamps" (Qwen3-VL: one span per temporal patch after its `<t seconds>` text).
    video: Any = None  # shared.video.VideoRule
    video_prompt: str = "flat"


def token_fields(ids: dict[str, int]) -> dict[str, int]:
    """The special-token ids every Qwen-VL config.json carries."""
    return {
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
    }
