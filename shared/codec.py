"""Embedding payload codec: `EmbeddingPayload` <-> msgpack bytes, the Redis value (its envelope is below).

Envelope (a msgpack map):
    v     int          FORMAT_VERSION
    fp    str          producing model's fingerprint
    id    str          image id (sha256 of the image bytes) the payload belongs to
    grid  [t, h, w]    patch grid before the spatial merge
    dtype str          "float32" | "bfloat16" | "float16", shared by every tensor
    emb   record       embeddings [n_tokens, hidden]
    ds    [record]     deepstack levels, each [n_tokens, hidden] (empty for Qwen2/2.5-VL)
    vid   map          video clips only: {"spg": second_per_grid_t, "ts": [timestamp per temporal patch]}
    sum   int          CRC-32 over the metadata (with "vid" when present) and every tensor's bytes

A tensor record is a map {dtype, shape, data}: `data` is the tensor's raw little-endian bytes.
Records are built and read by `tensor_to_record` / `tensor_from_record`, so a chunked gRPC
transfer can reuse them. Pickle is never involved: decoding untrusted bytes runs no code.
"""

from __future__ import annotations

import math
import sys
import zlib
from typing import Any

import msgpack
import torch

from .errors import CorruptPayload
from .hardware import DTYPE_NAMES
from .image_size import grid_tokens
from .payload import EmbeddingPayload, VideoTiming
from .version import PAYLOAD_FORMAT

FORMAT_VERSION = PAYLOAD_FORMAT

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES if name != "auto"}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_REQUIRED_KEYS = ("fp", "id", "grid", "dtype", "emb", "ds", "sum")
_RECORD_KEYS = ("dtype", "shape", "data")
# Wire bytes are little-endian; on a big-endian host every tensor is byte-swapped on the way in/out.
_NATIVE_LITTLE = sys.byteorder == "little"


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a supported dtype; ValueError for any other (a producer bug, not bad data)."""
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"unsupported payload dtype {dtype}; supported: {', '.join(DTYPES)}")
    return _DTYPE_NAMES[dtype]


def _swap_bytes(raw: torch.Tensor, itemsize: int) -> torch.Tensor:
    """raw: [n_bytes] uint8 -> same bytes with each `itemsize` group reversed (endianness flip)."""
    return raw.view(-1, itemsize).flip(-1).reshape(-1).contiguous()


def tensor_to_record(tensor: torch.Tensor) -> dict[str, Any]:
    """Tensor -> {dtype, shape, data}; `data` is a zero-copy memoryview on little-endian hosts."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    raw = flat.view(torch.uint8)  # [numel * itemsize]
    if not _NATIVE_LITTLE:
        raw = _swap_bytes(raw, flat.element_size())
    return {
        "dtype": dtype_name(tensor.dtype),
        "shape": list(tensor.shape),
        "data": memoryview(raw.numpy()),
    }


def _check_record(record: Any, what: str) -> torch.dtype:
    """Validate a record's structure and byte length; return its torch dtype."""
    if not isinstance(record, dict) or any(k not in record for k in _RECORD_KEYS):
        raise CorruptPayload(f"{what}: tensor record must be a map with keys {list(_RECORD_KEYS)}")
    name, shape, data = record["dtype"], record["shape"], record["data"]
    if name not in DTYPES:
        raise CorruptPayload(f"{what}: unknown dtype {name!r}; supported: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CorruptPayload(f"{what}: shape must be a list of non-negative ints, got {shape!r}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CorruptPayload(f"{what}: data must be bytes, got {type(data).__name__}")
    expected = math.prod(shape) * DTYPES[name].itemsize
    if len(data) != expected:
        raise CorruptPayload(
            f"{what}: truncated or padded buffer: {len(data)} bytes, shape {list(shape)} "
            f"of {name} needs {expected}"
        )
    return DTYPES[name]


def tensor_from_record(record: Any, what: str = "tensor") -> torch.Tensor:
    """{dtype, shape, data} -> a writable CPU tensor owning its memory (one copy of `data`)."""
    dtype = _check_record(record, what)
    shape = list(record["shape"])
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)  # torch.frombuffer refuses empty buffers
    # bytearray: the one copy that makes the tensor writable (no torch non-writable warning).
    raw = torch.frombuffer(bytearray(record["data"]), dtype=torch.uint8)
    if not _NATIVE_LITTLE:
        raw = _swap_bytes(raw, dtype.itemsize)
    return raw.view(dtype).reshape(shape)


def _checksum(version: int, fp: str, image_id: str, grid: list, name: str, records: list[dict],
              video: dict | None = None) -> int:
    """CRC-32 over packed metadata (version, fingerprint, image id, grid, dtype, shapes), then each buffer.

    CRC-32 rather than blake2b: measured on this host for 40 MB, zlib.crc32 ~2000 MB/s versus
    blake2b(digest_size=16) ~600 MB/s (sha256 ~1600). The checksum guards against accidental
    corruption (truncation, bit rot, a bad write), not an adversary: Redis is trusted, and CRC-32
    detects every burst error up to 32 bits and misses random damage with probability 2**-32.
    """
    fields = [version, fp, image_id, list(grid), name, [list(r["shape"]) for r in records]]
    meta = msgpack.packb(fields if video is None else [*fields, video["spg"], list(video["ts"])])
    crc = zlib.crc32(meta)
    for record in records:
        crc = zlib.crc32(record["data"], crc)
    return crc


ENVELOPE_BYTES = 4096  # the most an envelope adds to its tensors' bytes (keys, fingerprint, id, shapes, checksum)


def payload_size(n_tokens: int, hidden: int, deepstack_levels: int, dtype: torch.dtype = torch.float32) -> int:
    """An upper bound on the encoded size of one image's payload."""
    return n_tokens * hidden * (1 + deepstack_levels) * dtype.itemsize + ENVELOPE_BYTES


def encode_payload(payload: EmbeddingPayload, dtype: torch.dtype | None = None) -> bytes:
    """Payload -> msgpack bytes. `dtype` casts every tensor first (e.g. bf16 on the wire);
    by default deepstack tensors travel in the embeddings' dtype."""
    target = payload.embeddings.dtype if dtype is None else dtype
    name = dtype_name(target)
    emb = tensor_to_record(payload.embeddings.to(target))
    ds = [tensor_to_record(t.to(target)) for t in payload.deepstack]
    grid = [int(x) for x in payload.grid_thw]
    video = None if payload.video is None else {"spg": float(payload.video.second_per_grid_t),
                                                "ts": [float(t) for t in payload.video.timestamps]}
    envelope = {
        "v": FORMAT_VERSION,
        "fp": payload.fingerprint,
        "id": payload.image_id,
        "grid": grid,
        "dtype": name,
        "emb": emb,
        "ds": ds,
        "sum": _checksum(FORMAT_VERSION, payload.fingerprint, payload.image_id, grid, name, [emb, *ds], video),
    }
    if video is not None:
        envelope["vid"] = video
    parts: list[bytes | memoryview] = []
    _pack_parts(envelope, parts, msgpack.Packer(autoreset=True))
    return b"".join(parts)  # the one copy of the tensor bytes


def _pack_parts(obj: Any, out: list[bytes | memoryview], packer: msgpack.Packer) -> None:
    """Append obj's msgpack encoding to `out`, keeping memoryviews as they are.

    msgpack.packb would copy each tensor twice (into its buffer, then into bytes); framing
    the bin headers here lets the final b"".join copy it once. Output is plain msgpack.
    """
    if isinstance(obj, dict):
        out.append(packer.pack_map_header(len(obj)))
        for key, value in obj.items():
            out.append(packer.pack(key))
            _pack_parts(value, out, packer)
    elif isinstance(obj, list):
        out.append(packer.pack_array_header(len(obj)))
        for item in obj:
            _pack_parts(item, out, packer)
    elif isinstance(obj, memoryview):
        out.append(_bin_header(obj.nbytes))
        out.append(obj)
    else:
        out.append(packer.pack(obj))


def _bin_header(n_bytes: int) -> bytes:
    """msgpack bin 8/16/32 header (type byte + big-endian length)."""
    for type_byte, width in ((0xC4, 1), (0xC5, 2), (0xC6, 4)):
        if n_bytes < 1 << (8 * width):
            return bytes([type_byte]) + n_bytes.to_bytes(width, "big")
    raise ValueError(f"tensor of {n_bytes} bytes exceeds msgpack's 4 GiB bin limit")


def _unpack_envelope(data: bytes) -> dict:
    """Bytes -> envelope map with every required key and the right version."""
    try:
        envelope = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises ValueError, TypeError, FormatError... for garbage
        raise CorruptPayload(f"payload is not valid msgpack ({type(exc).__name__}: {exc})") from exc
    if not isinstance(envelope, dict):
        raise CorruptPayload(f"payload is a msgpack {type(envelope).__name__}, expected a map")
    if "v" not in envelope:
        raise CorruptPayload("payload has no format version (key 'v')")
    if envelope["v"] != FORMAT_VERSION:
        raise CorruptPayload(
            f"payload format v{envelope['v']}, this server reads v{FORMAT_VERSION}"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in envelope]
    if missing:
        raise CorruptPayload(f"payload is missing keys {missing}")
    return envelope


def _check_metadata(envelope: dict) -> list[dict]:
    """Validate fingerprint, grid, dtype and records; return the records [emb, *ds]."""
    fp, grid, name, ds = envelope["fp"], envelope["grid"], envelope["dtype"], envelope["ds"]
    if not isinstance(fp, str):
        raise CorruptPayload(f"fingerprint must be a string, got {type(fp).__name__}")
    if not isinstance(envelope["id"], str):
        raise CorruptPayload(f"image id must be a string, got {type(envelope['id']).__name__}")
    if not isinstance(grid, list) or len(grid) != 3 or not all(isinstance(x, int) for x in grid):
        raise CorruptPayload(f"grid_thw must be three ints, got {grid!r}")
    if name not in DTYPES:
        raise CorruptPayload(f"unknown dtype {name!r}; supported: {', '.join(DTYPES)}")
    if not isinstance(ds, list):
        raise CorruptPayload(f"deepstack must be a list of tensor records, got {type(ds).__name__}")
    records = [envelope["emb"], *ds]
    whats = ["embeddings", *(f"deepstack[{i}]" for i in range(len(ds)))]
    for record, what in zip(records, whats):
        if DTYPES[name] != _check_record(record, what):
            raise CorruptPayload(
                f"{what}: dtype {record['dtype']} differs from payload dtype {name}"
            )
    return records


def _check_shapes(emb_shape: list[int], ds_shapes: list[list[int]]) -> None:
    if len(emb_shape) != 2:
        raise CorruptPayload(
            f"embeddings must be 2-D [n_tokens, hidden], got shape {list(emb_shape)}"
        )
    for i, shape in enumerate(ds_shapes):
        if list(shape) != list(emb_shape):
            raise CorruptPayload(
                f"deepstack[{i}] shape {list(shape)} differs from "
                f"embeddings shape {list(emb_shape)}"
            )


def decode_payload(data: bytes) -> EmbeddingPayload:
    """msgpack bytes -> payload with writable CPU tensors; CorruptPayload names what is wrong."""
    envelope = _unpack_envelope(data)
    records = _check_metadata(envelope)
    video = _check_video(envelope.get("vid"), envelope["grid"])
    crc = _checksum(envelope["v"], envelope["fp"], envelope["id"], envelope["grid"], envelope["dtype"], records,
                    envelope.get("vid"))
    if crc != envelope["sum"]:
        raise CorruptPayload(
            f"checksum mismatch: payload says {envelope['sum']!r}, bytes give {crc} "
            "(corrupted in transit or at rest)"
        )
    _check_shapes(records[0]["shape"], [r["shape"] for r in records[1:]])
    return EmbeddingPayload(
        embeddings=tensor_from_record(records[0], "embeddings"),
        grid_thw=tuple(envelope["grid"]),
        fingerprint=envelope["fp"],
        image_id=envelope["id"],
        deepstack=tuple(
            tensor_from_record(r, f"deepstack[{i}]") for i, r in enumerate(records[1:])
        ),
        video=video,
    )


def _check_video(video: Any, grid: list) -> VideoTiming | None:
    """A clip's timing: a positive finite second_per_grid_t and one finite timestamp per temporal patch."""
    if video is None:
        return None
    if not isinstance(video, dict) or set(video) != {"spg", "ts"}:
        raise CorruptPayload("video timing must be a map with keys spg and ts")
    spg, ts = video["spg"], video["ts"]
    if not isinstance(spg, (int, float)) or not (math.isfinite(spg) and spg > 0):
        raise CorruptPayload(f"video second_per_grid_t must be a positive number, got {spg!r}")
    if (not isinstance(ts, list) or len(ts) != grid[0]
            or not all(isinstance(t, (int, float)) and math.isfinite(t) and t >= 0 for t in ts)):
        raise CorruptPayload(f"video timestamps must be {grid[0]} non-negative numbers (one per temporal patch)")
    return VideoTiming(float(spg), tuple(float(t) for t in ts))


def validate_payload(
    payload: EmbeddingPayload, merge_size: int, hidden_size: int | None = None
) -> None:
    """Checks that need the model: n_tokens == t*h*w / merge**2 and, if given, the hidden size."""
    _check_shapes(list(payload.embeddings.shape), [list(t.shape) for t in payload.deepstack])
    t, h, w = payload.grid_thw
    if min(t, h, w) <= 0 or (h % merge_size) or (w % merge_size):
        raise CorruptPayload(
            f"grid_thw {list(payload.grid_thw)} is not a positive grid "
            f"divisible by merge size {merge_size}"
        )
    expected = grid_tokens((t, h, w), merge_size)
    if payload.n_tokens != expected:
        raise CorruptPayload(
            f"payload has {payload.n_tokens} tokens, grid_thw {list(payload.grid_thw)} with "
            f"merge size {merge_size} needs {expected}"
        )
    hidden = payload.embeddings.shape[1]
    if hidden_size is not None and hidden != hidden_size:
        raise CorruptPayload(f"payload hidden size {hidden}, this model expects {hidden_size}")
