"""Request migration: a decoder resumes an answer from the tokens another replica already delivered
(prompt + those tokens prefilled), and the result is the uninterrupted greedy answer; the gateway does
it when a decoder dies mid-stream, so the client sees one identical answer."""

from __future__ import annotations

import signal

import grpc
import pytest

from engines import engines, image_payload, request
from procs import Redis, Service, running
from reference import reference_tokens
from services.gateway.routing import rendezvous
from shared.errors import InvalidRequest
from shared.image_ids import image_id
from shared.images import load_image
from stack import ask_request
from vlsplit.v1 import gateway_pb2_grpc

from conftest import make_image

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
QUESTION = "Describe the picture in detail."


@pytest.mark.parametrize("family", FAMILIES)
def test_resumed_answer_equals_the_uninterrupted_one(tiny_models, family):
    path = tiny_models[family]
    _, decoder = engines(path)
    payload, img_id, _ = image_payload(path, seed=61)
    full = list(decoder.generate(request(payload, img_id, QUESTION, max_new_tokens=24)))
    ids = [e.token_id for e in full if e.token_id is not None]
    text = "".join(e.text for e in full)
    assert len(ids) >= 6
    for k in (1, len(ids) // 2, len(ids) - 1):
        prepared = decoder.prepare([request(payload, img_id, QUESTION).messages], [payload],
                                   request(payload, img_id, QUESTION, max_new_tokens=24).sampling, (img_id,),
                                   resume=tuple(ids[:k]))
        rest = [event for _, event in decoder.stream(prepared)]
        assert [e.token_id for e in rest if e.token_id is not None] == ids[k:]
        delivered = decoder.intake.prompts.tokenizer.decode(ids[:k], skip_special_tokens=True)
        assert text.startswith(delivered[:len(delivered) - 2])
        assert rest[-1].finish_reason == full[-1].finish_reason


def test_resume_is_validated(tiny_models):
    path = tiny_models["qwen2_vl"]
    _, decoder = engines(path)
    payload, img_id, _ = image_payload(path, seed=61)
    messages = [request(payload, img_id, QUESTION).messages]
    sampling = request(payload, img_id, QUESTION, max_new_tokens=4).sampling
    for resume, message in (((1, 2, 3, 4), "max_new_tokens is 4"), ((10 ** 7,), "vocabulary")):
        with pytest.raises(InvalidRequest, match=message):
            decoder.prepare(messages, [payload], sampling, (img_id,), resume=resume)


def _long_question(model: str, image) -> tuple[str, int]:
    """A question whose greedy answer runs to max_new_tokens (no early EOS), so there is time to kill."""
    for question in (QUESTION, "What is this?", "Tell me a long story about it.", "List every colour."):
        if len(reference_tokens(model, [image], question, 160)) == 160:
            return question, 160
    pytest.fail("no question found whose answer is long enough")


def test_decoder_killed_mid_stream_the_answer_continues_on_another(tiny_models, tmp_path):
    model = tiny_models["qwen2_vl"]
    data = make_image(96, 96, seed=71)
    image = load_image(data)
    question, steps = _long_question(model, image)
    expected = reference_tokens(model, [image], question, steps)
    redis = Redis()
    encoder = Service("encoder", "--model", model, "--redis", redis.url, log_dir=tmp_path)
    decoders = [Service("decoder", "--model", model, log_dir=tmp_path) for _ in range(2)]
    with running(redis, encoder, *decoders):
        gateway = Service("gateway", "--encoder", encoder.address, "--decoder",
                          ",".join(d.address for d in decoders), "--redis", redis.url, log_dir=tmp_path)
        with running(gateway), grpc.insecure_channel(gateway.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            stream = stub.AskStream(ask_request(data, question, max_new_tokens=steps), timeout=120)
            got: list[int] = []
            first = next(stream)
            got += list(first.token_ids)
            # the replica streaming this answer (the image's first in rendezvous order) dies, mid-answer
            first_choice = rendezvous(image_id(data), [d.address for d in decoders])[0]
            serving = next(d for d in decoders if d.address == first_choice)
            serving.proc.send_signal(signal.SIGKILL)
            final = None
            for reply in stream:
                got += list(reply.token_ids)
                if reply.HasField("final"):
                    final = reply.final
            assert got == expected and list(final.token_ids) == expected
            assert len(first.token_ids) < steps  # it really was mid-answer
            assert gateway.metric("vlsplit_gateway_migrations_total") == 1
