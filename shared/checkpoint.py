"""A local Hugging Face-layout checkpoint directory, read lazily.

Knows which file holds which tensor (single `model.safetensors` or a sharded index), splits
tensor names into visual and language parts for both key layouts, and reads only the tensors it
is asked for with `safe_open`, so the encoder never touches language weights and the decoder never
touches visual ones. `reads` records every tensor name read, for tests and logs.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from .errors import CheckpointError
from .families import Family, get_family
from .families.base import LANGUAGE_PREFIXES, LM_HEAD, VISUAL_PREFIXES

log = logging.getLogger("vlsplit.checkpoint")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class Checkpoint:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{self.path} is not a checkpoint directory: no config.json")
        self.reads: list[str] = []

    @cached_property
    def config(self) -> PretrainedConfig:
        # Check the family first: transformers raises a bare ValueError for a model_type it lacks.
        try:
            model_type = json.loads((self.path / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{self.path}/config.json cannot be read: {exc}") from exc
        get_family(model_type)
        return AutoConfig.from_pretrained(self.path, local_files_only=True)

    @cached_property
    def family(self) -> Family:
        return get_family(self.config.model_type)

    @cached_property
    def tensor_files(self) -> dict[str, Path]:
        """Tensor name -> the safetensors file holding it."""
        if (self.path / INDEX_FILE).is_file():
            weight_map = json.loads((self.path / INDEX_FILE).read_text())["weight_map"]
            return {name: self.path / shard for name, shard in weight_map.items()}
        if (self.path / SINGLE_FILE).is_file():
            with safe_open(self.path / SINGLE_FILE, framework="pt") as f:
                return {name: self.path / SINGLE_FILE for name in f.keys()}
        raise CheckpointError(f"{self.path} has neither {SINGLE_FILE} nor {INDEX_FILE}")

    def visual_names(self) -> dict[str, str]:
        """Checkpoint name -> name inside the vision tower, for every visual tensor."""
        return _strip_prefixes(self.tensor_files, VISUAL_PREFIXES)

    def language_names(self) -> dict[str, str]:
        """Checkpoint name -> name inside the text model (`lm_head.weight` kept as is)."""
        names = {n: n for n in self.tensor_files if n == LM_HEAD}
        non_visual = [n for n in self.tensor_files if not n.startswith(VISUAL_PREFIXES) and n != LM_HEAD]
        names.update(_strip_prefixes(non_visual, LANGUAGE_PREFIXES))
        return names

    def read(self, names: dict[str, str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Read the given tensors (checkpoint name -> new name), each cast to `dtype` as it is read."""
        start = time.perf_counter()
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.tensor_files[name]].append(name)
        out = {}
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in file_names:
                    out[names[name]] = f.get_tensor(name).to(dtype)
                    self.reads.append(name)
        log.info("read %d tensors from %s in %.2fs", len(out), self.path.name, time.perf_counter() - start)
        return out


def _strip_prefixes(names, prefixes: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for name in names:
        for prefix in prefixes:
            if name.startswith(prefix):
                out[name] = name[len(prefix):]
                break
    return out


def load_strict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load every parameter of `module` from `state`, failing on any missing or unexpected tensor.

    Parameters are replaced (`assign=True`), so the module takes the checkpoint tensors' dtype while
    non-persistent buffers such as rotary `inv_freq` keep the float32 they were built with.
    """
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match {type(module).__name__}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    module.load_state_dict(state, strict=True, assign=True)
