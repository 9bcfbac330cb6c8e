"""Model-family registry, looked up by the checkpoint's `model_type`."""

from __future__ import annotations

from ..errors import CheckpointError
from .base import Family
from . import qwen2_5_vl, qwen2_vl, qwen3_vl

FAMILIES: dict[str, Family] = {f.model_type: f for f in (qwen2_vl.FAMILY, qwen2_5_vl.FAMILY, qwen3_vl.FAMILY)}


def get_family(model_type: str) -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise CheckpointError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        ) from None


__all__ = ["FAMILIES", "Family", "get_family"]
