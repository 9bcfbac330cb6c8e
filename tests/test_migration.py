"""Request migration: a decoder resumes an answer from the tokens another replica already delivered
(prompt + those tokens prefilled), and the result is the uninterrupted greedy answer; the gateway does
it when a decoder dies mid-stream, so the client sees one identical answer."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import pytest

from engines import engines, image_payload, request
from services.llm_decoder.engine import GenerationInput
from shared.schema import question_messages
from shared.sampling import ResponseFormat, SamplingParams
from procs import Redis, Service, running
from reference import reference_tokens
from services.gateway.routing import rendezvous
from shared.errors import InvalidRequest
from shared.image_ids import image_id
from shared.images import load_image
from stack import ask_request
from vlsplit.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

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


# Opt-in: the same migration, streamed, runs by default in test_migrated_answers_keep_their_promises (a
# ChatStream whose decoder dies after its first tokens continues on another, token-exact).
@pytest.mark.slow
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


def test_every_answer_of_a_batch_resumes_from_its_own_tokens(tiny_models):
    """Per-conversation resume (what a migrated AskMany or n > 1 sends): each row continues its answer."""
    path = tiny_models["qwen2_vl"]
    _, decoder = engines(path)
    payload, img_id, _ = image_payload(path, seed=62)
    questions = [QUESTION, "What is this?", "List every colour."]
    reqs = [request(payload, img_id, q, max_new_tokens=20) for q in questions]
    full: dict[int, list[int]] = {i: [] for i in range(3)}
    for index, event in decoder.generate_batch(reqs):
        if event.token_id is not None:
            full[index].append(event.token_id)
    resume = (tuple(full[0][:5]), (), tuple(full[2][:len(full[2]) - 1]))
    prepared = decoder.prepare([r.messages for r in reqs], [payload], [r.sampling for r in reqs], (img_id,),
                               resume=resume)
    rest: dict[int, list[int]] = {i: [] for i in range(3)}
    for index, event in decoder.stream(prepared):
        if event.token_id is not None:
            rest[index].append(event.token_id)
    assert [list(resume[i]) + rest[i] for i in range(3)] == [full[i] for i in range(3)]
    with pytest.raises(InvalidRequest, match="2 resumed answers for 3 conversations"):
        decoder.prepare([r.messages for r in reqs], [payload], [r.sampling for r in reqs], (img_id,),
                        resume=((1,), (2,)))


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["description"],
          "properties": {"description": {"type": "string", "minLength": 150, "maxLength": 200}}}


def _kill_when_decoding(decoder: Service, steps: int) -> None:
    """SIGKILL `decoder` once it has run `steps` more engine steps (it is mid-answer then)."""
    start = decoder.metric("vlsplit_decoder_step_seconds_count")
    deadline = time.monotonic() + 60
    while decoder.metric("vlsplit_decoder_step_seconds_count") < start + steps:
        assert time.monotonic() < deadline, "the decoder never started answering"
    decoder.proc.send_signal(signal.SIGKILL)


def test_migrated_answers_keep_their_promises(tiny_models, tmp_path):
    """A decoder dies mid-answer: a JSON-schema answer resumes through the grammar (the JSON parses and
    equals the uninterrupted one), and AskMany's and n = 2's answers each resume on the other decoder."""
    model = tiny_models["qwen2_vl"]
    data = make_image(96, 96, seed=72)
    image = load_image(data)
    question, steps = _long_question(model, image)
    _, engine = engines(model)
    expected = reference_tokens(model, [image], question, steps)
    fmt = ResponseFormat(json_schema=json.dumps(SCHEMA))
    [encoded] = engines(model)[0].encode([image])
    schema_expected = [e.token_id for e in engine.generate(GenerationInput(
        question_messages(question), [encoded.named(image_id(data))],
        SamplingParams(max_new_tokens=300, response_format=fmt), (image_id(data),))) if e.token_id is not None]
    redis = Redis()
    encoder = Service("encoder", "--model", model, "--redis", redis.url, log_dir=tmp_path)
    decoders = [Service("decoder", "--model", model, log_dir=tmp_path) for _ in range(4)]
    with running(redis, encoder, *decoders):
        gateway = Service("gateway", "--encoder", encoder.address, "--decoder",
                          ",".join(d.address for d in decoders), "--redis", redis.url, log_dir=tmp_path)
        order = rendezvous(image_id(data), [d.address for d in decoders])
        by_address = {d.address: d for d in decoders}
        with running(gateway), grpc.insecure_channel(gateway.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            # 1. a JSON-schema Chat, streamed: the first decoder dies after the first tokens
            turn = gateway_pb2.ChatTurn(role="user", content=[gateway_pb2.ChatTurnPart(image=gateway_pb2.ImageRef(data=data)),
                                                              gateway_pb2.ChatTurnPart(text=question)])
            schema_format = common_pb2.ResponseFormat(json_schema=json.dumps(SCHEMA))
            stream = stub.ChatStream(gateway_pb2.ChatRequest(messages=[turn], sampling=common_pb2.SamplingParams(
                max_new_tokens=300, response_format=schema_format)), timeout=120)
            first = next(stream)
            by_address[order[0]].proc.send_signal(signal.SIGKILL)
            got, text = list(first.token_ids), first.text
            for reply in stream:
                got += list(reply.token_ids)
                text += reply.text
            assert got == schema_expected
            jsonschema.validate(json.loads(text), SCHEMA)
            # 2. AskMany of three long answers: the next decoder in the image's order dies mid-batch
            with ThreadPoolExecutor(1) as pool:
                many = pool.submit(stub.AskMany, gateway_pb2.AskManyRequest(
                    image=gateway_pb2.ImageRef(image_id=image_id(data)), questions=[question] * 3,
                    sampling=common_pb2.SamplingParams(max_new_tokens=steps)), timeout=120)
                _kill_when_decoding(by_address[order[1]], 20)
                answers = many.result(timeout=120).answers
            assert [list(a.token_ids) for a in answers] == [expected] * 3
            # 3. n = 2 answers of one Chat, streamed: the third decoder dies after the first tokens
            stream = stub.ChatStream(gateway_pb2.ChatRequest(messages=[turn], n=2, sampling=common_pb2.SamplingParams(
                max_new_tokens=steps)), timeout=120)
            first = next(stream)
            by_address[order[2]].proc.send_signal(signal.SIGKILL)
            rows = {0: [], 1: []}
            rows[first.index] += list(first.token_ids)
            final = None
            for reply in stream:
                rows[reply.index] += list(reply.token_ids)
                if reply.HasField("final"):
                    final = reply.final
            assert rows == {0: expected, 1: expected}
            assert [list(c.token_ids) for c in final.choices] == [expected, expected]
            assert gateway.metric("vlsplit_gateway_migrations_total") == 3
