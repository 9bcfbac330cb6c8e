"""Model fingerprint: what a cached embedding depends on (the cache key carries it: shared/cache.py embedding_key).

The fingerprint covers the visual weights and the image-processor settings, and nothing else:
it changes when either changes and stays put when only language weights change. Both the
encoder and the decoder compute it, and the decoder must never materialise a visual tensor, so
no tensor is created here: safetensors headers are parsed by hand and the raw byte ranges of
visual tensors are stream-hashed straight from the files.

Visual tensors are named `visual.*` (Qwen2/2.5 hub layout) or `model.visual.*` (Qwen3 and
transformers 5 saves); names are normalised to `visual.*`, so both layouts of the same weights
share a fingerprint, as do single-file and sharded checkpoints.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError

log = logging.getLogger("vlsplit.fingerprint")

INDEX_FILE = "model.safetensors.index.json"
_CHUNK = 8 << 20  # 8 MiB reads: large enough to stream at disk speed, small enough to not matter
_MAX_HEADER = 100 << 20  # safetensors' own header limit
_ALGORITHM = 1  # bump when the hashed document changes; invalidates on-disk caches
_PROCESSOR_KEYS = (
    "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
    "rescale_factor", "do_rescale", "do_normalize", "do_resize", "resample", "do_convert_rgb",
)
# Files whose (size, mtime, inode) key the memo; safetensors files are added by glob.
_KEY_FILES = ("config.json", "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
              INDEX_FILE)


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live; `name` is as stored (what `safe_open.get_tensor` wants)."""

    file: Path
    name: str
    dtype: str  # safetensors dtype, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in `file`, [begin, end)
    end: int


def visual_name(name: str) -> str | None:
    """`model.visual.x` / `visual.x` -> `visual.x`; None for every non-visual tensor."""
    name = name.removeprefix("model.")
    return name if name.startswith("visual.") else None


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Tensor name -> entry, from the 8-byte little-endian length + JSON header of `path`."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= min(_MAX_HEADER, path.stat().st_size - 8):
                raise ValueError(f"header length {n} does not fit the file")
            header = json.loads(f.read(n))
        start = 8 + n  # data_offsets are relative to the end of the header
        return {
            name: TensorEntry(path, name, meta["dtype"], tuple(meta["shape"]),
                              start + meta["data_offsets"][0], start + meta["data_offsets"][1])
            for name, meta in header.items()
            if name != "__metadata__"
        }
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors header ({exc})") from exc


def _visual_files(ckpt: Path) -> tuple[list[Path], set[str] | None]:
    """Files holding visual tensors and, for a sharded checkpoint, the names the index promises."""
    index = ckpt / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        promised = {name for name in weight_map if visual_name(name)}
        return sorted({ckpt / weight_map[name] for name in promised}), promised
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{ckpt}: no *.safetensors file and no {INDEX_FILE}")
    return files, None


def visual_tensor_index(checkpoint_dir: str | os.PathLike) -> dict[str, TensorEntry]:
    """Normalised visual tensor name (`visual.*`) -> entry; reads headers only."""
    ckpt = Path(checkpoint_dir)
    files, promised = _visual_files(ckpt)
    index: dict[str, TensorEntry] = {}
    for file in files:
        for entry in read_safetensors_header(file).values():
            key = visual_name(entry.name)
            if key is None or (promised is not None and entry.name not in promised):
                continue
            if key in index:
                raise CheckpointError(
                    f"{ckpt}: {key} is stored twice ({index[key].name}, {entry.name})"
                )
            index[key] = entry
    if promised is not None and len(index) != len(promised):
        missing = sorted(promised - {e.name for e in index.values()})[:5]
        raise CheckpointError(f"{ckpt}: {INDEX_FILE} lists tensors missing from shards: {missing}")
    if not index:
        raise CheckpointError(f"{ckpt}: no visual tensors (visual.* or model.visual.*)")
    return index


def processor_settings(preprocessor_config: dict[str, Any]) -> dict[str, Any]:
    """The image-processor settings that change embeddings, in one canonical shape."""
    settings = {key: preprocessor_config.get(key) for key in _PROCESSOR_KEYS}
    size = preprocessor_config.get("size")
    size = size if isinstance(size, dict) else {}
    # Explicit min/max_pixels win over `size`, as in transformers' Qwen2VLImageProcessor.
    for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        value = preprocessor_config.get(key)
        settings[key] = size.get(edge) if value is None else value
    return settings


def largest_image_tokens(ckpt: str | Path) -> int:
    """Tokens of the largest image the checkpoint's processor allows (max_pixels, after the merge)."""
    settings = processor_settings(processor_config(Path(ckpt)))
    side = settings["patch_size"] * settings["merge_size"]
    return settings["max_pixels"] // (side * side)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def processor_config(ckpt: Path) -> dict[str, Any]:
    """preprocessor_config.json, or the `image_processor` section of a transformers-5
    processor_config.json."""
    if (ckpt / "preprocessor_config.json").is_file():
        return _read_json(ckpt / "preprocessor_config.json")
    if (ckpt / "processor_config.json").is_file():
        return _read_json(ckpt / "processor_config.json").get("image_processor", {})
    raise CheckpointError(f"{ckpt}: no preprocessor_config.json or processor_config.json")


def _digest_tensors(entries: dict[str, TensorEntry]) -> dict[str, str]:
    """Normalised name -> sha256 of the tensor's raw bytes; one open per file, read in order."""
    buf = memoryview(bytearray(_CHUNK))
    digests: dict[str, str] = {}
    by_file: dict[Path, list[tuple[str, TensorEntry]]] = {}
    for key, entry in entries.items():
        by_file.setdefault(entry.file, []).append((key, entry))
    for file, items in by_file.items():
        with open(file, "rb", buffering=0) as f:
            for key, entry in sorted(items, key=lambda item: item[1].begin):
                digests[key] = _digest_range(f, entry, buf)
    return digests


def _digest_range(f: Any, entry: TensorEntry, buf: memoryview) -> str:
    digest = hashlib.sha256()  # sha256: ~1.6 GB/s here with SHA extensions, faster than blake2b
    f.seek(entry.begin)
    left = entry.end - entry.begin
    while left:
        n = f.readinto(buf[: min(left, len(buf))])
        if not n:
            raise CheckpointError(f"{entry.file}: truncated inside tensor {entry.name}")
        digest.update(buf[:n])
        left -= n
    return digest.hexdigest()


def _fingerprint_uncached(ckpt: Path) -> str:
    started = time.perf_counter()
    entries = visual_tensor_index(ckpt)
    digests = _digest_tensors(entries)
    config = _read_json(ckpt / "config.json")
    vision_config = {  # drop save-time bookkeeping (`_name_or_path`, versions): no effect on output
        k: v for k, v in (config.get("vision_config") or {}).items()
        if not k.startswith("_") and k != "transformers_version"
    }
    document = {
        "algorithm": _ALGORITHM,
        "model_type": config.get("model_type"),
        "vision_config": vision_config,
        "processor": processor_settings(processor_config(ckpt)),
        "tensors": [[k, e.dtype, list(e.shape), digests[k]] for k, e in sorted(entries.items())],
    }
    if (ckpt / "video_preprocessor_config.json").is_file():  # a clip's defaults (fps, frames, pixels) too
        video = _read_json(ckpt / "video_preprocessor_config.json")
        document["video_processor"] = {k: v for k, v in video.items() if not k.startswith("_")}
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    # 16 hex chars = 64 bits: ample against accidental collisions, short enough for cache keys.
    fingerprint = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    elapsed = time.perf_counter() - started
    if elapsed > 1.0:
        n_bytes = sum(e.end - e.begin for e in entries.values())
        log.info("fingerprint %s of %s: hashed %d visual tensors (%.0f MB) in %.1f s",
                 fingerprint, ckpt, len(entries), n_bytes / 1e6, elapsed)
    return fingerprint


def _memo_key(ckpt: Path) -> str:
    """Absolute path + (size, mtime_ns, inode) of every file the fingerprint may read."""
    paths = sorted({*(ckpt / name for name in _KEY_FILES), *ckpt.glob("*.safetensors")})
    files = []
    for path in paths:
        if path.exists():
            st = path.stat()
            files.append([path.name, st.st_size, st.st_mtime_ns, st.st_ino])
    return json.dumps({"algorithm": _ALGORITHM, "path": str(ckpt), "files": files})


def _read_disk_cache(path: Path, key: str) -> str | None:
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        return entry["fingerprint"] if entry.get("key") == key else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # absent or damaged: recompute


def _write_disk_cache(path: Path, key: str, fingerprint: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "fingerprint": fingerprint}), encoding="utf-8")
        os.replace(tmp, path)  # atomic: concurrent writers never leave a half file
    except OSError as exc:
        log.warning("cannot write fingerprint cache %s: %s", path, exc)


@functools.lru_cache(maxsize=64)
def _memoised(key: str, ckpt: Path, cache_dir: Path | None) -> str:
    if cache_dir is None:
        return _fingerprint_uncached(ckpt)
    disk = cache_dir / f"fp-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
    if (cached := _read_disk_cache(disk, key)) is not None:
        return cached
    fingerprint = _fingerprint_uncached(ckpt)
    _write_disk_cache(disk, key, fingerprint)
    return fingerprint


def compute_fingerprint(
    checkpoint_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> str:
    """16 hex chars (truncated sha256) identifying visual weights + image-processor settings.

    Memoised in process, and on disk under `cache_dir` when given (None: no disk cache; the
    service config chooses the directory, since only config modules read the environment).
    """
    ckpt = Path(checkpoint_dir).resolve()
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: not a checkpoint directory")
    return _memoised(_memo_key(ckpt), ckpt, Path(cache_dir).resolve() if cache_dir else None)


def clear_memo() -> None:
    """Forget in-process fingerprints (tests; a process that rewrites checkpoints in place)."""
    _memoised.cache_clear()
