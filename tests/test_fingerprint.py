"""Model fingerprint: follows visual weights and processor settings, ignores language weights."""

from __future__ import annotations

import builtins
import io
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shared import fingerprint as fp_module
from shared.errors import CheckpointError
from shared.fingerprint import (
    INDEX_FILE,
    clear_memo,
    compute_fingerprint,
    processor_settings,
    visual_tensor_index,
)

PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "rescale_factor": 1 / 255,
    "do_rescale": True, "do_normalize": True, "do_resize": True, "resample": 3,
    "do_convert_rgb": True, "image_processor_type": "Qwen2VLImageProcessor",
}
CONFIG = {
    "model_type": "qwen2_5_vl",
    "vision_config": {"depth": 1, "hidden_size": 8, "out_hidden_size": 16, "patch_size": 14},
    "text_config": {"hidden_size": 16, "num_hidden_layers": 1},
}


def visual_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "visual.patch_embed.proj.weight": torch.randn(8, 3, 2, 2, 2, generator=gen),
        "visual.blocks.0.attn.qkv.weight": torch.randn(24, 8, generator=gen).bfloat16(),
        "visual.merger.mlp.0.weight": torch.randn(16, 32, generator=gen),
    }


def language_tensors(seed: int = 1, rows: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "model.language_model.embed_tokens.weight": torch.randn(rows, 16, generator=gen),
        "model.layers.0.mlp.up_proj.weight": torch.randn(rows, 16, generator=gen),
        "lm_head.weight": torch.randn(rows, 16, generator=gen),
    }


def write_checkpoint(
    path: Path,
    visual: dict[str, torch.Tensor] | None = None,
    language: dict[str, torch.Tensor] | None = None,
    config: dict | None = None,
    preprocessor: dict | None = None,
    prefix: str = "",
    sharded: bool = False,
) -> Path:
    """A tiny Hugging Face layout checkpoint; `prefix="model."` gives `model.visual.*` names."""
    path.mkdir(parents=True)
    visual = visual_tensors() if visual is None else visual
    tensors = {prefix + k: v for k, v in visual.items()}
    tensors |= language_tensors() if language is None else language
    if sharded:  # two visual tensors in shard 1; the rest, mixed with language, in shard 2
        names = sorted(tensors)
        first = [n for n in names if "visual" in n][:2]
        shards = {
            "model-00001-of-00002.safetensors": first,
            "model-00002-of-00002.safetensors": [n for n in names if n not in first],
        }
        for shard, shard_names in shards.items():
            save_file({n: tensors[n] for n in shard_names}, str(path / shard))
        weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
        (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config or CONFIG))
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor or PREPROCESSOR))
    return path


@pytest.fixture(autouse=True)
def _fresh_memo():
    clear_memo()
    yield
    clear_memo()


@pytest.fixture
def reference(tmp_path) -> str:
    return compute_fingerprint(write_checkpoint(tmp_path / "reference"))


def test_fingerprint_is_stable_short_hex(tmp_path, reference):
    again = compute_fingerprint(write_checkpoint(tmp_path / "again"))
    assert again == reference and len(reference) == 16 and int(reference, 16) >= 0


def test_changes_when_one_visual_weight_changes(tmp_path, reference):
    visual = visual_tensors()
    visual["visual.blocks.0.attn.qkv.weight"][3, 5] += 1
    assert compute_fingerprint(write_checkpoint(tmp_path / "edited", visual=visual)) != reference


@pytest.mark.parametrize(
    ("key", "value"),
    [("min_pixels", 4096), ("max_pixels", 1003520), ("image_mean", [0.5, 0.5, 0.5]),
     ("image_std", [0.5, 0.5, 0.5]), ("patch_size", 16), ("merge_size", 1),
     ("temporal_patch_size", 1), ("do_normalize", False)],
)
def test_changes_with_processor_settings(tmp_path, reference, key, value):
    ckpt = write_checkpoint(tmp_path / key, preprocessor={**PREPROCESSOR, key: value})
    assert compute_fingerprint(ckpt) != reference


def test_changes_with_vision_config(tmp_path, reference):
    config = {**CONFIG, "vision_config": {**CONFIG["vision_config"], "depth": 2}}
    assert compute_fingerprint(write_checkpoint(tmp_path / "deeper", config=config)) != reference


def test_unchanged_when_only_language_weights_or_config_change(tmp_path, reference):
    config = {**CONFIG, "text_config": {"hidden_size": 16, "num_hidden_layers": 7}}
    language = language_tensors(seed=9, rows=6)
    ckpt = write_checkpoint(tmp_path / "lm", language=language, config=config)
    assert compute_fingerprint(ckpt) == reference


def test_size_dict_equals_min_max_pixels():
    legacy = {k: v for k, v in PREPROCESSOR.items() if k not in ("min_pixels", "max_pixels")}
    modern = {**legacy, "size": {"shortest_edge": 3136, "longest_edge": 12845056}}
    assert processor_settings(modern) == processor_settings(PREPROCESSOR)
    # explicit min/max_pixels override `size`, as in transformers
    both = {**modern, "min_pixels": 1024}
    assert processor_settings(both)["min_pixels"] == 1024


def test_same_for_visual_and_model_visual_layouts(tmp_path, reference):
    assert compute_fingerprint(write_checkpoint(tmp_path / "hf5", prefix="model.")) == reference


@pytest.mark.parametrize("prefix", ["", "model."])
def test_same_for_single_file_and_sharded(tmp_path, reference, prefix):
    ckpt = write_checkpoint(tmp_path / "sharded", prefix=prefix, sharded=True)
    assert len(list(ckpt.glob("*.safetensors"))) == 2
    assert compute_fingerprint(ckpt) == reference


def test_index_points_at_the_stored_bytes(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", prefix="model.", sharded=True)
    index = visual_tensor_index(ckpt)
    assert sorted(index) == sorted(visual_tensors())
    for key, entry in index.items():
        assert entry.name == "model." + key
        with safe_open(str(entry.file), "pt") as f:
            tensor = f.get_tensor(entry.name)
        raw = entry.file.read_bytes()[entry.begin : entry.end]
        assert raw == tensor.contiguous().view(torch.uint8).numpy().tobytes()
        assert entry.shape == tuple(tensor.shape)


def test_checkpoint_errors_are_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors file"):
        compute_fingerprint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        compute_fingerprint(tmp_path / "absent")
    text_only = write_checkpoint(tmp_path / "text_only", visual={})
    with pytest.raises(CheckpointError, match="no visual tensors"):
        compute_fingerprint(text_only)
    (text_only / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="unreadable safetensors header"):
        compute_fingerprint(text_only)


def test_disk_cache_serves_a_fresh_process_and_follows_file_changes(tmp_path, monkeypatch):
    ckpt = write_checkpoint(tmp_path / "ckpt")
    first = compute_fingerprint(ckpt, cache_dir=tmp_path / "cache")
    clear_memo()  # as if a new process started
    monkeypatch.setattr(fp_module, "_fingerprint_uncached", lambda ckpt: pytest.fail("rehashed"))
    assert compute_fingerprint(ckpt, cache_dir=tmp_path / "cache") == first
    monkeypatch.undo()
    stat = (ckpt / "preprocessor_config.json").stat()
    (ckpt / "preprocessor_config.json").write_text(json.dumps({**PREPROCESSOR, "merge_size": 4}))
    os.utime(ckpt / "preprocessor_config.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert compute_fingerprint(ckpt, cache_dir=tmp_path / "cache") != first


class _CountingFile:
    """Binary file proxy logging (file name, offset, n_bytes) for every read."""

    def __init__(self, f, name: str, reads: list):
        self._f, self._name, self._reads = f, name, reads

    def read(self, *args):
        offset, data = self._f.tell(), self._f.read(*args)
        self._reads.append((self._name, offset, len(data)))
        return data

    def readinto(self, buffer):
        offset, n = self._f.tell(), self._f.readinto(buffer)
        self._reads.append((self._name, offset, n or 0))
        return n

    def __getattr__(self, attr):
        return getattr(self._f, attr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def tensor_ranges(ckpt: Path) -> dict[str, tuple[str, int, int]]:
    """Tensor name -> (file name, begin, end), parsed here independently of the module."""
    ranges = {}
    for file in ckpt.glob("*.safetensors"):
        raw = file.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        for name, meta in json.loads(raw[8 : 8 + n]).items():
            if name != "__metadata__":
                begin, end = meta["data_offsets"]
                ranges[name] = (file.name, 8 + n + begin, 8 + n + end)
    return ranges


@pytest.mark.parametrize("sharded", [False, True])
def test_never_reads_language_tensor_bytes(tmp_path, monkeypatch, sharded):
    language = language_tensors(rows=4096)  # 256 KiB each, far more than the visual bytes
    ckpt = write_checkpoint(tmp_path / "ckpt", language=language, sharded=sharded)
    ranges = tensor_ranges(ckpt)
    reads: list[tuple[str, int, int]] = []
    real_open = io.open

    def counting_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return _CountingFile(f, Path(file).name, reads) if "b" in mode else f

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    compute_fingerprint(ckpt)
    monkeypatch.undo()

    def bytes_read_in(name: str) -> int:
        file, begin, end = ranges[name]
        return sum(max(0, min(end, off + n) - max(begin, off)) for f, off, n in reads if f == file)

    for name in ranges:
        if "visual" in name:  # positive control: the visual bytes were hashed
            assert bytes_read_in(name) == ranges[name][2] - ranges[name][1], name
        else:
            assert bytes_read_in(name) == 0, name
