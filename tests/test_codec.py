"""Embedding payload codec: exact round trips, and every kind of damage named as CorruptPayload."""

from __future__ import annotations

import struct
import warnings

import msgpack
import pytest
import torch

from shared import codec
from shared.codec import (
    ENVELOPE_BYTES,
    FORMAT_VERSION,
    decode_payload,
    encode_payload,
    payload_size,
    tensor_from_record,
    tensor_to_record,
    validate_payload,
)
from shared.errors import CorruptPayload
from shared.payload import EmbeddingPayload

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_payload(dtype=torch.float32, levels=0, grid=(1, 4, 6), hidden=8) -> EmbeddingPayload:
    n_tokens = grid[0] * grid[1] * grid[2] // 4  # merge size 2
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(n_tokens, hidden, generator=gen).to(dtype)
    ds = tuple(torch.randn(n_tokens, hidden, generator=gen).to(dtype) for _ in range(levels))
    return EmbeddingPayload(emb, grid, "0123456789abcdef", ds, "ab" * 32)


def reseal(envelope: dict) -> bytes:
    """Re-pack a tampered envelope with a valid checksum, to reach the checks behind it."""
    records = [envelope["emb"], *envelope["ds"]]
    envelope["sum"] = codec._checksum(
        envelope["v"], envelope["fp"], envelope["id"], envelope["grid"], envelope["dtype"], records
    )
    return msgpack.packb(envelope)


def assert_same(a: EmbeddingPayload, b: EmbeddingPayload) -> None:
    assert a.grid_thw == b.grid_thw and a.fingerprint == b.fingerprint and a.image_id == b.image_id
    assert a.embeddings.dtype == b.embeddings.dtype
    assert torch.equal(a.embeddings, b.embeddings)
    assert len(a.deepstack) == len(b.deepstack)
    for x, y in zip(a.deepstack, b.deepstack):
        assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.mark.parametrize("levels", [0, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_exact(dtype, levels):
    payload = make_payload(dtype, levels)
    assert_same(decode_payload(encode_payload(payload)), payload)


def test_encode_casts_every_tensor():
    payload = make_payload(torch.float32, levels=2)
    decoded = decode_payload(encode_payload(payload, dtype=torch.bfloat16))
    assert_same(decoded, payload.to(torch.bfloat16))
    assert msgpack.unpackb(encode_payload(payload, dtype=torch.float16))["dtype"] == "float16"


def test_envelope_is_plain_msgpack_with_little_endian_bytes():
    payload = make_payload(torch.float32)
    envelope = msgpack.unpackb(encode_payload(payload))
    assert envelope["v"] == FORMAT_VERSION and envelope["grid"] == [1, 4, 6]
    assert envelope["emb"]["shape"] == [6, 8] and envelope["ds"] == []
    values = payload.embeddings.flatten().tolist()
    assert envelope["emb"]["data"] == struct.pack(f"<{len(values)}f", *values)


def test_decoded_tensors_are_writable_without_warning():
    data = encode_payload(make_payload(torch.bfloat16, levels=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = decode_payload(data)
    decoded.embeddings[0, 0] = 1.0
    decoded.deepstack[0][0, 0] = 1.0


def test_empty_payload_round_trips():
    empty = EmbeddingPayload(torch.empty(0, 8), (1, 0, 0), "fp")
    assert decode_payload(encode_payload(empty)).embeddings.shape == (0, 8)


def test_record_helpers_round_trip_non_contiguous_tensor():
    tensor = torch.arange(24, dtype=torch.float16).reshape(4, 6).t()
    assert torch.equal(tensor_from_record(msgpack.unpackb(msgpack.packb(tensor_to_record(tensor)))),
                       tensor)


def test_encode_refuses_unsupported_dtype():
    with pytest.raises(ValueError, match="unsupported payload dtype"):
        encode_payload(make_payload(torch.float32), dtype=torch.float64)


@pytest.mark.parametrize("levels", [0, 2])
def test_flipped_byte_anywhere_in_a_tensor_fails_checksum(levels):
    data = encode_payload(make_payload(torch.bfloat16, levels))
    envelope = msgpack.unpackb(data)
    blobs = [envelope["emb"]["data"], *(r["data"] for r in envelope["ds"])]
    for blob in blobs:
        start = data.index(blob)
        for offset in (0, len(blob) // 2, len(blob) - 1):
            damaged = bytearray(data)
            damaged[start + offset] ^= 0x01
            with pytest.raises(CorruptPayload, match="checksum mismatch"):
                decode_payload(bytes(damaged))


def test_changed_metadata_fails_checksum():
    envelope = msgpack.unpackb(encode_payload(make_payload()))
    for key, value in (("fp", "fedcba9876543210"), ("grid", [1, 6, 4]), ("id", "cd" * 32)):
        with pytest.raises(CorruptPayload, match="checksum mismatch"):
            decode_payload(msgpack.packb({**envelope, key: value}))
    reshaped = {**envelope, "emb": {**envelope["emb"], "shape": [8, 6]}}
    with pytest.raises(CorruptPayload, match="checksum mismatch"):
        decode_payload(msgpack.packb(reshaped))


def test_truncated_tensor_buffer_is_named():
    envelope = msgpack.unpackb(encode_payload(make_payload(torch.float16, levels=1)))
    envelope["ds"][0]["data"] = envelope["ds"][0]["data"][:-2]
    with pytest.raises(CorruptPayload, match=r"deepstack\[0\]: truncated .* 94 bytes.*needs 96"):
        decode_payload(msgpack.packb(envelope))


def test_truncated_message_is_not_msgpack():
    data = encode_payload(make_payload())
    with pytest.raises(CorruptPayload, match="not valid msgpack"):
        decode_payload(data[: len(data) // 2])


def test_embeddings_must_be_two_dimensional():
    envelope = msgpack.unpackb(encode_payload(make_payload()))
    envelope["emb"]["shape"] = [48]
    with pytest.raises(CorruptPayload, match=r"embeddings must be 2-D .* got shape \[48\]"):
        decode_payload(reseal(envelope))


def test_deepstack_shape_must_match_embeddings():
    envelope = msgpack.unpackb(encode_payload(make_payload(levels=2)))
    envelope["ds"][1]["shape"] = [12, 4]
    with pytest.raises(CorruptPayload, match=r"deepstack\[1\] shape \[12, 4\] differs"):
        decode_payload(reseal(envelope))


def test_wrong_version_is_named():
    envelope = msgpack.unpackb(encode_payload(make_payload()))
    envelope["v"] = FORMAT_VERSION - 1
    with pytest.raises(CorruptPayload, match=f"payload format v{FORMAT_VERSION - 1}, this server reads v{FORMAT_VERSION}"):
        decode_payload(msgpack.packb(envelope))


def test_unknown_dtype_is_named():
    envelope = msgpack.unpackb(encode_payload(make_payload()))
    envelope["dtype"] = envelope["emb"]["dtype"] = "float64"
    with pytest.raises(CorruptPayload, match="unknown dtype 'float64'"):
        decode_payload(reseal(envelope))


def test_record_dtype_must_match_payload_dtype():
    envelope = msgpack.unpackb(encode_payload(make_payload(torch.float16)))
    envelope["emb"]["dtype"] = "bfloat16"
    with pytest.raises(CorruptPayload, match="dtype bfloat16 differs from payload dtype float16"):
        decode_payload(reseal(envelope))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xc1garbage", "not valid msgpack"),
        (b"", "not valid msgpack"),
        (msgpack.packb([1, 2, 3]), "msgpack list, expected a map"),
        (msgpack.packb({"fp": "x"}), "no format version"),
        (msgpack.packb({"v": FORMAT_VERSION, "fp": "x"}), r"missing keys \['id', 'grid', 'dtype', 'emb', 'ds'"),
    ],
)
def test_garbage_is_corrupt(data, message):
    with pytest.raises(CorruptPayload, match=message):
        decode_payload(data)


def test_validate_payload_checks_tokens_against_grid_and_hidden_size():
    payload = make_payload(grid=(1, 4, 6), hidden=8)
    validate_payload(payload, merge_size=2, hidden_size=8)
    with pytest.raises(CorruptPayload, match="6 tokens, grid_thw \\[1, 4, 6\\] .* needs 24"):
        validate_payload(payload, merge_size=1)
    with pytest.raises(CorruptPayload, match="hidden size 8, this model expects 16"):
        validate_payload(payload, merge_size=2, hidden_size=16)
    bad_grid = EmbeddingPayload(payload.embeddings, (1, 4, 7), "fp")
    with pytest.raises(CorruptPayload, match="divisible by merge size 2"):
        validate_payload(bad_grid, merge_size=2)


def test_byte_swap_reverses_each_element():
    raw = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    assert codec._swap_bytes(raw, 2).tolist() == [2, 1, 4, 3]


@pytest.mark.parametrize("n_bytes", [0, 255, 256, 65535, 65536])
def test_zero_copy_framing_matches_msgpack(n_bytes):
    obj = {"a": [memoryview(bytes(range(256)) * (n_bytes // 256) + bytes(n_bytes % 256)), 1, "x"]}
    parts: list = []
    codec._pack_parts(obj, parts, msgpack.Packer())
    assert b"".join(parts) == msgpack.packb(obj)


def test_payload_size_bounds_the_encoded_size():
    for levels in (0, 3):
        payload = make_payload(torch.float32, levels=levels, grid=(1, 8, 12), hidden=16)
        size = len(encode_payload(payload))
        assert size <= payload_size(payload.n_tokens, 16, levels) < size + ENVELOPE_BYTES


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_default_limits_carry_the_largest_image_at_real_widths(family):
    """Known bug: Qwen3-VL's largest float32 payload (16384 tokens x 2048 x 4 levels = 537 MB at
    2B widths) passed the decoder's 512 MiB default and Redis's 512 MB bulk limit."""
    from services.llm_decoder.engine import default_payload_limit
    from shared.cache import PART_BYTES
    from shared.families import get_family

    fam = get_family(family)
    widths, processor = fam.sizes["bench"], fam.preprocessor
    side = processor["patch_size"] * processor["merge_size"]
    tokens = processor["max_pixels"] // (side * side)
    hidden = widths.vision.get("out_hidden_size", widths.text["hidden_size"])
    levels = len(widths.vision.get("deepstack_visual_indexes", []))
    size = payload_size(tokens, hidden, levels)
    assert tokens == 16384
    assert size <= default_payload_limit(tokens, hidden, levels)  # the decoder accepts it by default
    assert PART_BYTES < 512_000_000  # and Redis stores it, in parts each under its bulk limit
    if family == "qwen3_vl":
        assert size > 512 << 20  # what the old fixed defaults refused
