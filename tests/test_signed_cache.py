"""Signed cache entries: with VLSPLIT_CACHE_HMAC_KEY every value in Redis carries an HMAC bound to its
key, so entries written straight into Redis (a forged payload that names the right image and passes
its checksum, random bytes, a truncated entry, another model's entry, a wrong MAC) are dropped, counted
and recomputed, and the answer stays the monolithic model's. Stored image bytes are re-hashed on read."""

from __future__ import annotations

import pytest
import redis as redis_py

from conftest import make_image
from reference import reference_tokens
from shared.cache import Signer, embedding_key, image_key
from shared.codec import decode_payload, encode_payload
from shared.images import load_image
from stack import Stack, ask_request
from vlsplit.v1 import gateway_pb2

KEY = "k" * 40
QUESTION = "What is in this picture?"


def test_signer_binds_values_to_their_key():
    signer = Signer(KEY)
    sealed = signer.seal("vlsplit:emb:v2:{fp:a}", b"payload")
    assert signer.open("vlsplit:emb:v2:{fp:a}", sealed) == (b"payload", "")
    assert signer.open("vlsplit:emb:v2:{fp:b}", sealed) == (None, "forged")  # moved under another key
    assert Signer("x" * 40).open("vlsplit:emb:v2:{fp:a}", sealed) == (None, "forged")  # another key
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


def test_stored_image_bytes_are_rehashed_on_read(tiny_models, tmp_path):
    """Without a key, stored bytes that are not the image they are stored as are still refused."""
    stack = Stack(tiny_models["qwen2_vl"], tmp_path).start()
    try:
        raw = redis_py.Redis.from_url(stack.url)
        image, other = make_image(64, 64, seed=41), make_image(64, 64, seed=42)
        upload = stack.stub.UploadImage(gateway_pb2.UploadImageRequest(data=image), timeout=60)
        raw.set(image_key(upload.image_id), other)  # swapped bytes under the first image's id
        with pytest.raises(Exception) as info:
            stack.ask(upload.image_id, QUESTION)
        assert info.value.code().name == "NOT_FOUND"
        assert stack.encoder.metric("vlsplit_cache_rejected_total", reason="rehash") == 1
        assert raw.get(image_key(upload.image_id)) is None  # dropped
    finally:
        stack.stop()
