"""The decoder's payload negotiation, batched conversations and Classify, over real gRPC."""

from __future__ import annotations

import queue

import grpc
import pytest

from conftest import make_image
from procs import Service
from reference import reference_tokens
from test_prefix_cache import engines
from vlsplit.services.llm_decoder.classify import classify
from vlsplit.services.llm_decoder.engine import GenerationRequest
from vlsplit.shared.codec import encode_payload
from vlsplit.shared.images import image_id, load_image
from vlsplit.shared.processor import question_messages
from vlsplit.shared.transfer import chunks
from vlsplit.v1 import common_pb2, llm_decoder_pb2 as pb, llm_decoder_pb2_grpc

QUESTIONS = ["What is this?", "Describe the colours in detail.", "Is it day?"]


@pytest.fixture(scope="module")
def decoder(tiny_models, tmp_path_factory):
    service = Service("decoder", "--model", tiny_models["qwen2_vl"], log_dir=tmp_path_factory.mktemp("logs")).start()
    yield service
    service.kill()


def conversation(question: str) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role="user", content=[pb.ContentPart(image=pb.ImagePlaceholder()),
                                                 pb.ContentPart(text=question)])]


class Negotiation:
    """A bidi call whose requests are written one by one, so the client can react to need_payload."""

    def __init__(self, method, header: pb.GenerateHeader, payload: bytes):
        self.payload = payload
        self.requests: queue.Queue = queue.Queue()
        self.requests.put(pb.GenerateRequest(header=header))
        self.asked = False
        self.call = method(iter(self.requests.get, None), timeout=120)

    def replies(self):
        try:
            for reply in self.call:
                if reply.need_payload:
                    self.asked = True
                    self.requests.put(pb.GenerateRequest(payload_sizes=pb.PayloadSizes(payload_bytes=[len(self.payload)])))
                    for piece in chunks(self.payload):
                        self.requests.put(pb.GenerateRequest(payload_chunk=piece))
                    continue
                yield reply
        finally:
            self.requests.put(None)


def setup_image(path: str, seed: int):
    data = make_image(200, 160, seed=seed)
    payload = engines(path)[0].encode([load_image(data)])[0]
    return data, image_id(data), encode_payload(payload)


def test_cold_decoder_asks_for_the_payload_then_a_warm_one_needs_none(decoder, tiny_models):
    path = tiny_models["qwen2_vl"]
    data, img_id, blob = setup_image(path, seed=51)
    stub = llm_decoder_pb2_grpc.LLMDecoderStub(grpc.insecure_channel(decoder.address))
    answers = []
    for question in QUESTIONS[:2]:
        header = pb.GenerateHeader(messages=conversation(question), image_ids=[img_id],
                                   sampling=common_pb2.SamplingParams(max_new_tokens=10))
        bytes_before = decoder.metric("vlsplit_decoder_payload_bytes_total")
        talk = Negotiation(stub.Generate, header, blob)
        replies = list(talk.replies())
        answers.append((talk.asked, replies, decoder.metric("vlsplit_decoder_payload_bytes_total") - bytes_before))
    (asked1, replies1, bytes1), (asked2, replies2, bytes2) = answers
    assert asked1 and bytes1 == len(blob) and not replies1[0].prefix_cached
    assert not asked2 and bytes2 == 0 and replies2[0].prefix_cached
    image = load_image(data)
    for question, replies in zip(QUESTIONS, (replies1, replies2)):
        assert [t for r in replies for t in r.token_ids] == reference_tokens(path, [image], question, 10)


def test_batch_of_conversations_equals_separate_answers(decoder, tiny_models):
    path = tiny_models["qwen2_vl"]
    data, img_id, blob = setup_image(path, seed=52)
    stub = llm_decoder_pb2_grpc.LLMDecoderStub(grpc.insecure_channel(decoder.address))
    header = pb.GenerateHeader(batch=[pb.Conversation(messages=conversation(q)) for q in QUESTIONS],
                               image_ids=[img_id], sampling=common_pb2.SamplingParams(max_new_tokens=8))
    tokens: dict[int, list[int]] = {i: [] for i in range(len(QUESTIONS))}
    for reply in Negotiation(stub.Generate, header, blob).replies():
        tokens[reply.index].extend(reply.token_ids)
    image = load_image(data)
    assert [tokens[i] for i in range(len(QUESTIONS))] == [reference_tokens(path, [image], q, 8) for q in QUESTIONS]


def test_classify_rpc_equals_engine_scores(decoder, tiny_models):
    path = tiny_models["qwen2_vl"]
    data, img_id, blob = setup_image(path, seed=53)
    labels = ["yes", "no", "not sure"]
    stub = llm_decoder_pb2_grpc.LLMDecoderStub(grpc.insecure_channel(decoder.address))
    header = pb.GenerateHeader(messages=conversation("Is it safe?"), image_ids=[img_id], labels=labels)
    [reply] = list(Negotiation(stub.Classify, header, blob).replies())
    encoder, engine = engines(path)
    payload = encoder.encode([load_image(data)])[0]
    expected = classify(engine, GenerationRequest(question_messages("Is it safe?"), [payload]), labels)
    assert [(s.label, round(s.logprob, 4)) for s in reply.scores] == [(s.label, round(s.logprob, 4)) for s in expected]


def test_payload_sizes_for_the_wrong_image_count_is_invalid(decoder, tiny_models):
    _, img_id, blob = setup_image(tiny_models["qwen2_vl"], seed=54)
    stub = llm_decoder_pb2_grpc.LLMDecoderStub(grpc.insecure_channel(decoder.address))
    header = pb.GenerateHeader(messages=conversation("hi"), image_ids=[img_id])
    requests = [pb.GenerateRequest(header=header),
                pb.GenerateRequest(payload_sizes=pb.PayloadSizes(payload_bytes=[len(blob), 5]))]
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(iter(requests), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "payload_sizes" in err.value.details()
