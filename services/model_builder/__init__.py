"""Random-weight Qwen-VL checkpoints built offline (`vlsplit make-model`): the embedded default of
`vlsplit up`, the tests' tiny models and the benchmarks' bench-size ones. `checkpoint` writes the
weights and configs, `tokenizer` the tokenizer and chat template."""

from services.model_builder.checkpoint import RANDOM_MARKER, make_model

__all__ = ["RANDOM_MARKER", "make_model"]
