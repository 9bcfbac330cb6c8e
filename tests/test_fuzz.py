"""Property-based fuzzing (hypothesis) of what untrusted bytes and text reach: the payload codec, image
loading, sampling validation and the chat/message builder. Whatever the input, the only exceptions are
our typed errors (which the interceptor turns into INVALID_ARGUMENT / DATA_LOSS), never a crash."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import make_image
from shared.codec import decode_payload, encode_payload
from shared.errors import BadImage, CorruptPayload, InvalidRequest, TooLarge
from shared.images import ImageLimits, load_image
from shared.payload import EmbeddingPayload
from shared.processor import PromptBuilder, validate_messages
from shared.sampling import SamplingParams
from services.llm_decoder.servicer import messages_from_pb
from vlsplit.v1 import llm_decoder_pb2

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=512 * 512, max_side=1024)


def _payload(n_tokens: int, hidden: int, levels: int) -> EmbeddingPayload:
    g = torch.Generator().manual_seed(n_tokens * 31 + hidden)
    return EmbeddingPayload(embeddings=torch.randn(n_tokens, hidden, generator=g), grid_thw=(1, 2, 2 * n_tokens),
                            deepstack=tuple(torch.randn(n_tokens, hidden, generator=g) for _ in range(levels)),
                            fingerprint="f" * 16).named("a" * 64)


VALID = encode_payload(_payload(4, 8, 1))


@FUZZ
@given(st.binary(max_size=4096))
def test_codec_refuses_arbitrary_bytes_with_corrupt_payload(data):
    try:
        decode_payload(data)
    except CorruptPayload:
        pass


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, len(VALID)))
def test_codec_detects_every_mutation_of_a_valid_payload(flips, cut):
    data = bytearray(VALID)
    for position, value in flips:
        data[position] = value
    data = bytes(data[:cut] if cut < len(VALID) and cut % 3 == 0 else data)
    try:
        payload = decode_payload(data)
    except CorruptPayload:
        return
    # a mutation that still decodes must have kept the content (e.g. a byte set to its own value)
    original = decode_payload(VALID)
    assert torch.equal(payload.embeddings, original.embeddings) and payload.grid_thw == original.grid_thw


@FUZZ
@given(st.integers(1, 6), st.integers(1, 16), st.integers(0, 3))
def test_codec_round_trips(n_tokens, hidden, levels):
    payload = _payload(n_tokens, hidden, levels)
    back = decode_payload(encode_payload(payload))
    assert torch.equal(back.embeddings, payload.embeddings) and back.grid_thw == payload.grid_thw
    assert all(torch.equal(a, b) for a, b in zip(back.deepstack, payload.deepstack))


PNG = make_image(32, 24, seed=5)


@FUZZ
@given(st.binary(max_size=2048))
def test_image_loading_refuses_arbitrary_bytes_cleanly(data):
    try:
        image = load_image(data, LIMITS)
    except (BadImage, TooLarge):
        return
    assert image.mode == "RGB" and image.width * image.height <= LIMITS.max_pixels


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(PNG) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       st.sampled_from(["PNG", "GIF", "BMP", "TIFF", "WEBP", "JPEG"]))
def test_image_loading_survives_corrupted_files(flips, fmt):
    buf = io.BytesIO()
    Image.open(io.BytesIO(PNG)).convert("RGB").save(buf, format=fmt)
    data = bytearray(buf.getvalue())
    for position, value in flips:
        data[position % len(data)] = value
    try:
        load_image(bytes(data), LIMITS)
    except (BadImage, TooLarge):
        pass


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**12, 10**12))


@FUZZ
@given(st.integers(-5, 10**7), numbers, numbers, st.integers(-100, 10**9),
       st.lists(st.text(max_size=40), max_size=20))
def test_sampling_validation_accepts_or_refuses_cleanly(max_new_tokens, temperature, top_p, top_k, stop):
    try:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
                                top_k=top_k, stop=tuple(stop)).validate(4096)
    except (InvalidRequest, TooLarge, OverflowError):
        return
    assert 1 <= params.max_new_tokens <= 4096 and math.isfinite(params.temperature) and params.temperature >= 0
    assert 0 < params.top_p <= 1 and params.top_k >= 0


texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60) | st.sampled_from(
    ["<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>", "<tool_call>", "\n", "system", "\ue000"])
parts = st.one_of(st.builds(lambda t: {"type": "text", "text": t}, texts), st.just({"type": "image"}),
                  st.just({"type": "video"}), st.just({"text": "no type"}), st.just("not a dict"))
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "robot", ""]),
                                           "content": st.one_of(texts, st.lists(parts, max_size=4))}),
                    max_size=4)


@pytest.fixture(scope="module")
def builder(tiny_models) -> PromptBuilder:
    return PromptBuilder.from_pretrained(tiny_models["qwen2_vl"], merge_size=2)


@FUZZ
@given(messages)
def test_message_builder_never_lets_text_make_special_tokens(builder, conversation):
    try:
        validate_messages(conversation)
    except InvalidRequest:
        return
    images = sum(isinstance(m["content"], list) and part.get("type") == "image"
                 for m in conversation for part in (m["content"] if isinstance(m["content"], list) else []))
    try:
        ids = builder(conversation, [(1, 2, 2)] * images).input_ids.tolist()
    except InvalidRequest:
        return
    specials = set(builder.tokenizer.added_tokens_decoder)
    image_id = builder.image_token_id
    template_only = [{**m, "content": [p for p in m["content"] if p.get("type") == "image"]
                      if isinstance(m["content"], list) else ""} for m in conversation]
    expected = [i for i in builder.token_ids(template_only) if i in specials]
    got = [i for i in ids if i in specials]
    # the special tokens are the template's, whatever the text (each image slot expanded to its tokens)
    assert [i for i in got if i != image_id] == [i for i in expected if i != image_id]


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant", "x"]),
                          st.lists(st.one_of(texts, st.none()), max_size=3)), max_size=3))
def test_messages_from_protobuf_accept_or_refuse_cleanly(raw):
    pb = [llm_decoder_pb2.ChatMessage(role=role, content=[
        llm_decoder_pb2.ContentPart(text=t) if t is not None else
        llm_decoder_pb2.ContentPart(image=llm_decoder_pb2.ImagePlaceholder()) for t in items]) for role, items in raw]
    try:
        out = messages_from_pb(pb)
    except InvalidRequest:
        return
    assert len(out) == len(raw) and all(m["role"] in ("system", "user", "assistant") for m in out)
