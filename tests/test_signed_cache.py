"""Signed cache entries: with VLSPLIT_CACHE_HMAC_KEY every value in Redis carries an HMAC bound to its
key, so entries written straight into Redis (a forged payload that names the right image and passes
its checksum, random bytes, a truncated entry, another model's entry, a wrong MAC) are dropped, counted
and recomputed, and the answer stays the monolithic model's. Stored image bytes are re-hashed on read."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis as redis_py

from conftest import make_image
from reference import reference_tokens
from shared.cache import Signer, embedding_key, image_key
from shared.codec import decode_payload, encode_payload
from shared.images import load_image
from procs import Service
from stack import Stack
from vlsplit.v1 import gateway_pb2

ROOT = Path(__file__).resolve().parents[1]
KEY = "5d0c8e1f9a27b4e36c1d0f8a9b2e7c4d5a6f3e2d1c0b9a8f7e6d5c4b3a291807"  # a test key, not a placeholder
QUESTION = "What is in this picture?"


def test_signer_binds_values_to_their_key():
    signer = Signer(KEY)
    sealed = signer.seal("vlsplit:emb:v2:{fp:a}", b"payload")
    assert signer.open("vlsplit:emb:v2:{fp:a}", sealed) == (b"payload", "")
    assert signer.open("vlsplit:emb:v2:{fp:b}", sealed) == (None, "forged")  # moved under another key
    assert Signer(KEY[::-1]).open("vlsplit:emb:v2:{fp:a}", sealed) == (None, "forged")  # another key
    assert signer.open("vlsplit:emb:v2:{fp:a}", b"payload") == (None, "unsigned")
    assert signer.open("vlsplit:emb:v2:{fp:a}", sealed[:-1]) == (None, "forged")  # truncated
    with pytest.raises(ValueError, match="at least 32"):
        Signer("short")


@pytest.fixture(scope="module")
def signed_stack(tiny_models, tmp_path_factory):
    secret = {"VLSPLIT_CACHE_HMAC_KEY": KEY}
    # No decoder prefix cache: every question fetches the image's payload, so every read of Redis counts.
    stack = Stack(tiny_models["qwen2_vl"], tmp_path_factory.mktemp("signed"), encoder_env=secret,
                  gateway_env=secret, decoder_env={"VLSPLIT_PREFIX_CACHING": "false"}).start()
    yield stack
    stack.stop()


def _forgeries(raw: redis_py.Redis, key: str, other_key: str, image_id: str) -> dict[str, bytes]:
    """What someone with write access to Redis but without the HMAC key can put under `key`."""
    sealed_other = raw.get(other_key)
    payload = decode_payload(sealed_other[36:]).named(image_id)  # another image's embeddings, renamed
    valid = encode_payload(payload)
    return {
        "consistent payload, unsigned": valid,
        "consistent payload, made-up MAC": b"vls1" + b"\0" * 32 + valid,
        "random bytes": bytes(range(256)) * 8,
        "truncated entry": raw.get(key)[:-100],
        "another image's signed entry": sealed_other,
    }


def test_forged_entries_are_never_served(signed_stack):
    stack = signed_stack
    raw = redis_py.Redis.from_url(stack.url)
    image, other = make_image(96, 80, seed=31), make_image(80, 96, seed=32)
    expected = reference_tokens(stack.model, [load_image(image)], QUESTION, 12)
    first = stack.ask(image, QUESTION)
    assert list(first.token_ids) == expected
    stack.ask(other, QUESTION)
    fingerprint = stack.encoder_fingerprint()
    key = embedding_key(fingerprint, first.image_id)
    other_key = embedding_key(fingerprint, stack.ask(other, QUESTION).image_id)
    assert raw.get(key).startswith(b"vls1")  # what the services wrote is sealed
    rejected = stack.gateway.metric("vlsplit_cache_rejected_total") + stack.encoder.metric(
        "vlsplit_cache_rejected_total")
    for name, forged in _forgeries(raw, key, other_key, first.image_id).items():
        raw.set(key, forged)
        answer = stack.ask(image, QUESTION)
        assert list(answer.token_ids) == expected, name
        assert answer.cache == gateway_pb2.CACHE_STATUS_MISS, name  # dropped, recomputed
        assert raw.get(key).startswith(b"vls1") and raw.get(key) != forged, name  # resealed by the encoder
    now = stack.gateway.metric("vlsplit_cache_rejected_total") + stack.encoder.metric("vlsplit_cache_rejected_total")
    assert now - rejected >= 5


@pytest.mark.parametrize("stack", ["qwen2_vl"], indirect=True)  # the shared stack: no key
def test_stored_image_bytes_are_rehashed_on_read(stack):
    """Without a key, stored bytes that are not the image they are stored as are still refused."""
    raw = redis_py.Redis.from_url(stack.url)
    image, other = make_image(64, 64, seed=41), make_image(64, 64, seed=42)
    rejected = stack.encoder.metric("vlsplit_cache_rejected_total", reason="rehash")
    upload = stack.stub.UploadImage(gateway_pb2.UploadImageRequest(data=image), timeout=60)
    raw.set(image_key(upload.image_id), other)  # swapped bytes under the first image's id
    with pytest.raises(Exception) as info:
        stack.ask(upload.image_id, QUESTION)
    assert info.value.code().name == "NOT_FOUND"
    assert stack.encoder.metric("vlsplit_cache_rejected_total", reason="rehash") == rejected + 1
    assert raw.get(image_key(upload.image_id)) is None  # dropped


# Multi-part entries: parts of 4 KiB, entries of at most 1 MiB, so a manifest may name at most 256 parts.
PARTS_ENV = {"VLSPLIT_CACHE_HMAC_KEY": KEY, "VLSPLIT_CACHE_PART_BYTES": "4096",
             "VLSPLIT_CACHE_MAX_ENTRY_BYTES": str(1 << 20)}
MANIFEST_V2 = b"vlsplit-parts:2\n"


@pytest.fixture(scope="module")
def parts_stack(tiny_models, tmp_path_factory):
    stack = Stack(tiny_models["qwen2_vl"], tmp_path_factory.mktemp("parts"), encoder_env=PARTS_ENV,
                  gateway_env=PARTS_ENV, decoder_env={"VLSPLIT_PREFIX_CACHING": "false"}).start()
    yield stack
    stack.stop()


@contextmanager
def redis_commands(url: str):
    """The commands Redis runs inside the block (MONITOR), each as its text ("MGET k1 k2")."""
    seen: list[str] = []
    client = redis_py.Redis.from_url(url)
    with client.monitor() as monitor:
        def listen():
            for event in monitor.listen():
                if "vlsplit-monitor-end" in event["command"]:
                    return
                seen.append(event["command"])

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        yield seen
        redis_py.Redis.from_url(url).echo("vlsplit-monitor-end")
        listener.join(60)
    client.close()


def _part_reads(commands: list[str]) -> list[str]:
    return [c[:200] for c in commands if c.split(" ", 1)[0].upper() in ("GET", "MGET", "GETEX", "GETDEL")
            and ":part:" in c]


def _multipart_entry(stack, seed: int) -> tuple[bytes, str, list[int]]:
    """A fresh image asked about once (a miss): its bytes, its cache key and the expected answer."""
    image = make_image(224, 224, seed=seed)
    expected = reference_tokens(stack.model, [load_image(image)], QUESTION, 12)
    first = stack.ask(image, QUESTION)
    assert list(first.token_ids) == expected and first.cache == gateway_pb2.CACHE_STATUS_MISS
    key = embedding_key(stack.encoder_fingerprint(), first.image_id)
    assert redis_py.Redis.from_url(stack.url).get(key).startswith(b"vlsplit-parts:")  # stored in parts
    return image, key, expected


def _rejected(stack) -> float:
    return stack.gateway.metric("vlsplit_cache_rejected_total") + stack.encoder.metric("vlsplit_cache_rejected_total")


def _cache_errors(stack) -> float:
    return stack.gateway.metric("vlsplit_cache_errors_total") + stack.encoder.metric("vlsplit_cache_errors_total")


def _assert_dropped_unread(stack, raw, image, key, expected, forged: bytes, name: str) -> None:
    raw.set(key, forged)
    rejected, encodes, errors = _rejected(stack), stack.encodes(), _cache_errors(stack)
    with redis_commands(stack.url) as commands:
        answer = stack.ask(image, QUESTION)
    assert _part_reads(commands) == [], f"{name}: parts were read before the manifest was checked"
    assert _cache_errors(stack) == errors, f"{name}: reading the parts timed out"  # a million keys in one MGET
    assert list(answer.token_ids) == expected, name
    assert answer.cache == gateway_pb2.CACHE_STATUS_MISS, name  # dropped, re-encoded
    assert stack.encodes() == encodes + 1, name
    assert _rejected(stack) >= rejected + 1, name
    assert raw.get(key) != forged and raw.get(key).startswith(b"vlsplit-parts:"), name  # rewritten by the encoder


def test_forged_manifest_of_a_million_parts_is_dropped_without_reading_a_part(parts_stack):
    stack, raw = parts_stack, redis_py.Redis.from_url(parts_stack.url)
    image, key, expected = _multipart_entry(stack, seed=61)
    million = {"nonce": "feedfacefeedface", "parts": 10**6, "bytes": 10**6 * 4096}
    listed = {"nonce": "feedfacefeedface", "total": 300 * 4096, "parts": [[4096, "0" * 64]] * 300}
    forgeries = {
        "a million parts, the first manifest format": b"vlsplit-parts:1\n" + json.dumps(million).encode(),
        "a million parts, unsigned": MANIFEST_V2 + json.dumps(million).encode(),
        "300 parts, made-up MAC": MANIFEST_V2 + b"vls1" + b"\0" * 32 + json.dumps(listed).encode(),
    }
    for name, forged in forgeries.items():
        _assert_dropped_unread(stack, raw, image, key, expected, forged, name)
    assert "manifest" in stack.gateway.metrics_by("vlsplit_cache_rejected_total", "reason")


def test_manifest_with_a_wrong_mac_is_dropped_and_the_image_reencoded(parts_stack):
    stack, raw = parts_stack, redis_py.Redis.from_url(parts_stack.url)
    image, key, expected = _multipart_entry(stack, seed=62)
    manifest = bytearray(raw.get(key))
    assert manifest.startswith(MANIFEST_V2 + b"vls1")  # the manifest is sealed
    manifest[len(MANIFEST_V2) + 4] ^= 1  # one bit of the MAC
    _assert_dropped_unread(stack, raw, image, key, expected, bytes(manifest), "wrong MAC")


def test_sealed_manifest_over_the_part_bound_is_dropped_unread(parts_stack):
    """Even a manifest sealed with the key is not followed past what the largest entry needs."""
    from shared.manifest import Manifest

    stack, raw = parts_stack, redis_py.Redis.from_url(parts_stack.url)
    image, key, expected = _multipart_entry(stack, seed=63)
    over = Manifest("feedfacefeedface", ((4096, "0" * 64),) * 257).seal(key, Signer(KEY))
    _assert_dropped_unread(stack, raw, image, key, expected, over, "257 parts, sealed")
    log = stack.gateway.log_path.read_text(errors="replace")
    assert "256 parts" in log and "VLSPLIT_CACHE_MAX_ENTRY_BYTES" in log


def test_valid_multipart_entry_still_hits(parts_stack):
    stack = parts_stack
    image, key, expected = _multipart_entry(stack, seed=64)
    rejected, encodes = _rejected(stack), stack.encodes()
    with redis_commands(stack.url) as commands:
        answer = stack.ask(image, QUESTION)
    assert answer.cache == gateway_pb2.CACHE_STATUS_HIT and list(answer.token_ids) == expected
    assert stack.encodes() == encodes and _rejected(stack) == rejected
    assert len(_part_reads(commands)) == 1  # one MGET of every part, after the manifest's GET


def _env_example(name: str) -> str:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return next(line.split("=", 1)[1] for line in lines if line.startswith(name + "="))


def test_placeholder_and_weak_keys_are_refused():
    placeholder = _env_example("VLSPLIT_CACHE_HMAC_KEY")
    for weak, why in ((placeholder, "placeholder"), ("a" * 64, "one character"), ("short", "at least 32"),
                      ("ab" * 32, "distinct characters")):
        with pytest.raises(ValueError, match=why) as info:
            Signer(weak)
        assert "VLSPLIT_CACHE_HMAC_KEY" in str(info.value)
    Signer(KEY)


def test_services_refuse_to_start_with_the_placeholder_key(tiny_models, tmp_path):
    env = {"VLSPLIT_CACHE_HMAC_KEY": _env_example("VLSPLIT_CACHE_HMAC_KEY")}
    services = [Service("gateway", "--encoder", "127.0.0.1:9", "--decoder", "127.0.0.1:9", env=env, log_dir=tmp_path),
                Service("encoder", "--model", tiny_models["qwen2_vl"], env=env, log_dir=tmp_path)]
    try:
        for service in services:
            service.start(wait=False)
        for service in services:
            try:
                returncode = service.proc.wait(timeout=60)
            except Exception:
                returncode = None
            assert returncode not in (None, 0), f"{service.kind} started with the placeholder key"
            assert "VLSPLIT_CACHE_HMAC_KEY" in service.tail() and "placeholder" in service.tail(), service.tail()
    finally:
        for service in services:
            service.kill()
