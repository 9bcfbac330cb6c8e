"""Random-weight Qwen-VL checkpoints built offline (`vlsplit make-model`): the embedded default of
`vlsplit up`, the tests' tiny models and the benchmarks' bench-size ones. `checkpoint` writes the
weights and configs, `tokenizer` the tokenizer and chat template."""

from __future__ import annotations

RANDOM_MARKER = "vlsplit_random_weights.json"  # tells the CLI to warn that answers are meaningless

__all__ = ["RANDOM_MARKER", "make_model"]


def __getattr__(name: str):
    # make_model needs torch and transformers (seconds to import): loaded on first use, so that checking a
    # directory for RANDOM_MARKER (`vlsplit up`, `local-ask`) costs nothing
    if name == "make_model":
        from services.model_builder.checkpoint import make_model

        return make_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
