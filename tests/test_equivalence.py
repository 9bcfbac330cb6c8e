"""The project's first test: the split path yields exactly the monolithic model's greedy tokens."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from reference import reference_tokens
from conftest import make_image
from services.llm_decoder.engine import DecoderEngine, GenerationInput
from shared.sampling import SamplingParams
from services.vision_encoder.engine import VisionEngine
from shared.codec import decode_payload, encode_payload
from shared.images import load_image
from shared.schema import question_messages

QUESTION = "What is in this picture? Describe it."


@lru_cache(maxsize=None)
def engines(path: str) -> tuple[VisionEngine, DecoderEngine]:
    return VisionEngine(path), DecoderEngine(path)


def split_tokens(path, images, question=QUESTION, max_new_tokens=20, payload_dtype=None):
    encoder, decoder = engines(path)
    payloads = encoder.encode(images)
    if payload_dtype is not None:  # through the wire format, as the services send it
        payloads = [decode_payload(encode_payload(p, dtype=payload_dtype)) for p in payloads]
    request = GenerationInput(question_messages(question, len(images)), payloads,
                                SamplingParams(max_new_tokens=max_new_tokens))
    return [e.token_id for e in decoder.generate(request) if e.token_id is not None], payloads


def image(width, height, seed=0):
    return load_image(make_image(width, height, seed))


def test_split_equals_monolithic(tiny_model):
    images = [image(320, 240)]
    ours, _ = split_tokens(tiny_model, images)
    assert len(ours) > 0
    assert ours == reference_tokens(tiny_model, images, QUESTION)


def test_oracle_is_sensitive_to_the_image(tiny_model):
    """Guards the oracle itself: with random weights the answer must still depend on the image."""
    a, _ = split_tokens(tiny_model, [image(320, 240, seed=1)])
    b, _ = split_tokens(tiny_model, [image(320, 240, seed=2)])
    assert a != b


def test_bf16_payload_equals_monolithic_fed_same_embeddings(tiny_model):
    images = [image(300, 200, seed=3)]
    ours, payloads = split_tokens(tiny_model, images, payload_dtype=torch.bfloat16)
    assert payloads[0].dtype == torch.bfloat16
    assert ours == reference_tokens(tiny_model, images, QUESTION, encoder_outputs=payloads)


def test_two_images_in_one_prompt(tiny_model):
    images = [image(256, 256, seed=4), image(400, 150, seed=5)]
    ours, _ = split_tokens(tiny_model, images, question="Compare the two pictures.")
    assert ours == reference_tokens(tiny_model, images, "Compare the two pictures.")


@pytest.mark.parametrize("size", [(2000, 60), (60, 2000), (40, 30), (1, 1), (997, 13)],
                         ids=["wide", "tall", "below-min-pixels", "one-pixel", "odd"])
def test_image_sizes(tiny_model, size):
    images = [image(*size, seed=6)]
    ours, _ = split_tokens(tiny_model, images, max_new_tokens=8)
    assert ours == reference_tokens(tiny_model, images, QUESTION, max_new_tokens=8)
