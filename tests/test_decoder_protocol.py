"""The decoder's payload negotiation, batched conversations, Classify checks, and what a client
cannot make it hold, over real gRPC."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import pytest

from conftest import make_image
from procs import Service
from reference import reference_tokens
from engines import engines
from services.llm_decoder.engine import GenerationInput
from shared.codec import encode_payload
from shared.image_ids import image_id
from shared.images import load_image
from shared.schema import question_messages
from shared.transfer import chunks
from vlsplit.v1 import common_pb2, llm_decoder_pb2 as pb, llm_decoder_pb2_grpc

QUESTIONS = ["What is this?", "Describe the colours in detail.", "Is it day?"]
IDLE_S = 3  # the fixture decoder's VLSPLIT_STREAM_IDLE_S


@pytest.fixture(scope="module")
def decoder(tiny_models, tmp_path_factory):
    service = Service("decoder", "--model", tiny_models["qwen2_vl"], log_dir=tmp_path_factory.mktemp("logs"),
                      env={"VLSPLIT_STREAM_IDLE_S": str(IDLE_S)}).start()
    yield service
    service.kill()


def stub_of(service: Service) -> llm_decoder_pb2_grpc.LLMDecoderStub:
    return llm_decoder_pb2_grpc.LLMDecoderStub(grpc.insecure_channel(service.address))


def conversation(question: str, system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    return messages + question_messages(question)


def pb_messages(messages: list[dict]) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role=m["role"], content=[
        pb.ContentPart(image=pb.ImagePlaceholder()) if p["type"] == "image" else pb.ContentPart(text=p["text"])
        for p in m["content"]]) for m in messages]


class Negotiation:
    """A bidi call whose requests are written one by one, so the client can react to need_payload."""

    def __init__(self, method, header: pb.GenerateHeader, payload: bytes, fetch_s: float = 0.0):
        self.payload, self.fetch_s = payload, fetch_s
        self.requests: queue.Queue = queue.Queue()
        self.requests.put(pb.GenerateRequest(header=header))
        self.asked = False
        self.call = method(iter(self.requests.get, None), timeout=120)

    def replies(self):
        try:
            for reply in self.call:
                if reply.need_payload:
                    self.asked = True
                    time.sleep(self.fetch_s)  # a client that has to encode the image first
                    self.requests.put(pb.GenerateRequest(payload_sizes=pb.PayloadSizes(payload_bytes=[len(self.payload)])))
                    for piece in chunks(self.payload):
                        self.requests.put(pb.GenerateRequest(payload_chunk=piece))
                    continue
                yield reply
        finally:
            self.requests.put(None)


def setup_image(path: str, seed: int):
    data = make_image(200, 160, seed=seed)
    payload = engines(path)[0].encode([load_image(data)])[0].named(image_id(data))
    return data, image_id(data), encode_payload(payload)


def test_cold_decoder_asks_for_the_payload_then_a_warm_one_needs_none(decoder, tiny_models):
    path = tiny_models["qwen2_vl"]
    data, img_id, blob = setup_image(path, seed=51)
    stub = stub_of(decoder)
    answers = []
    for question in QUESTIONS[:2]:
        header = pb.GenerateHeader(messages=pb_messages(question_messages(question)), image_ids=[img_id],
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


def batch_tokens(stub, conversations: list[list[dict]], img_id: str, blob: bytes, steps: int):
    header = pb.GenerateHeader(batch=[pb.Conversation(messages=pb_messages(c)) for c in conversations],
                               image_ids=[img_id], sampling=common_pb2.SamplingParams(max_new_tokens=steps))
    tokens: dict[int, list[int]] = {i: [] for i in range(len(conversations))}
    talk = Negotiation(stub.Generate, header, blob)
    for reply in talk.replies():
        tokens[reply.index].extend(reply.token_ids)
    return [tokens[i] for i in range(len(conversations))], talk.asked


def test_batch_of_conversations_equals_separate_answers(decoder, tiny_models):
    path = tiny_models["qwen2_vl"]
    data, img_id, blob = setup_image(path, seed=52)
    conversations = [question_messages(q) for q in QUESTIONS]
    tokens, _ = batch_tokens(stub_of(decoder), conversations, img_id, blob, 8)
    image = load_image(data)
    assert tokens == [reference_tokens(path, [image], q, 8) for q in QUESTIONS]


def test_batch_with_different_prefixes_answers_each_from_its_own(decoder, tiny_models):
    """Known bug: conversations of a batch reused conversation 0's cached prefix."""
    path = tiny_models["qwen2_vl"]
    data, img_id, blob = setup_image(path, seed=55)
    stub, image = stub_of(decoder), load_image(data)
    plain = conversation("What is this?")
    batch_tokens(stub, [plain], img_id, blob, 4)  # the image's prefix (no system prompt) is cached now
    terse = conversation("What is this?", system="You are a terse assistant.")
    tokens, asked = batch_tokens(stub, [plain, terse], img_id, blob, 8)
    assert tokens == [reference_tokens(path, [image], plain, 8), reference_tokens(path, [image], terse, 8)]
    assert tokens[0] != tokens[1]  # the system prompt matters, so reusing the wrong prefix would show
    assert asked  # the second conversation's prefix was never computed: its image needs the payload


def test_payload_for_another_image_is_invalid_and_caches_nothing(decoder, tiny_models):
    """Known bug: the decoder keyed cached KV by the header's image id, whatever the payload held."""
    path = tiny_models["qwen2_vl"]
    _, real_id, blob = setup_image(path, seed=56)
    claimed = "f" * 64
    header = pb.GenerateHeader(messages=pb_messages(question_messages("What?")), image_ids=[claimed],
                               sampling=common_pb2.SamplingParams(max_new_tokens=4))
    with pytest.raises(grpc.RpcError) as err:
        list(Negotiation(stub_of(decoder).Generate, header, blob).replies())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert real_id in err.value.details() and claimed in err.value.details()
    talk = Negotiation(stub_of(decoder).Generate, header, b"x")  # nothing was cached under the claimed id
    with pytest.raises(grpc.RpcError):
        list(talk.replies())
    assert talk.asked


def test_classify_checks_equal_engine_scores(decoder, tiny_models):
    path = tiny_models["qwen2_vl"]
    data, img_id, blob = setup_image(path, seed=53)
    checks = [("Is it safe?", ["yes", "no", "not sure"]), ("Is there text?", ["yes", "no"])]
    header = pb.GenerateHeader(batch=[pb.Conversation(messages=pb_messages(question_messages(q)), labels=labels)
                                      for q, labels in checks], image_ids=[img_id])
    replies = {reply.index: reply for reply in Negotiation(stub_of(decoder).Classify, header, blob).replies()}
    encoder, engine = engines(path)
    payload = encoder.encode([load_image(data)])[0]
    for i, (question, labels) in enumerate(checks):
        expected = engine.classify(GenerationInput(question_messages(question), [payload]), labels)
        assert [(s.label, round(s.logprob, 4)) for s in replies[i].scores] == \
               [(s.label, round(s.logprob, 4)) for s in expected]


def test_a_client_encoding_the_image_after_need_payload_is_not_dropped(decoder, tiny_models):
    """The idle limit guards chunks in flight; fetching or encoding the payload may take longer."""
    path = tiny_models["qwen2_vl"]
    data, img_id, blob = setup_image(path, seed=57)
    header = pb.GenerateHeader(messages=pb_messages(question_messages("What?")), image_ids=[img_id],
                               sampling=common_pb2.SamplingParams(max_new_tokens=4))
    talk = Negotiation(stub_of(decoder).Generate, header, blob, fetch_s=IDLE_S + 1)
    replies = list(talk.replies())
    assert talk.asked
    assert [t for r in replies for t in r.token_ids] == reference_tokens(path, [load_image(data)], "What?", 4)


def test_payload_sizes_for_the_wrong_image_count_is_invalid(decoder, tiny_models):
    _, img_id, blob = setup_image(tiny_models["qwen2_vl"], seed=54)
    header = pb.GenerateHeader(messages=pb_messages(question_messages("hi")), image_ids=[img_id])
    requests = [pb.GenerateRequest(header=header),
                pb.GenerateRequest(payload_sizes=pb.PayloadSizes(payload_bytes=[len(blob), 5]))]
    with pytest.raises(grpc.RpcError) as err:
        list(stub_of(decoder).Generate(iter(requests), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "payload_sizes" in err.value.details()


# ---- what a client cannot make the decoder hold ---------------------------------------------------


class Vanished:
    """A call that sends a header announcing payload bytes, then nothing, and never ends its stream."""

    def __init__(self, stub):
        self.silence = threading.Event()
        header = pb.GenerateHeader(messages=pb_messages(question_messages("hi")), payload_bytes=[1000],
                                   sampling=common_pb2.SamplingParams(max_new_tokens=2))

        def requests():
            yield pb.GenerateRequest(header=header)
            self.silence.wait()  # until the test ends

        self.call = stub.Generate(requests(), timeout=60)

    def code(self) -> grpc.StatusCode:
        try:
            list(self.call)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


def test_empty_chunks_do_not_keep_a_stalled_payload_alive(decoder):
    """Only payload bytes count as progress: a trickle of empty chunks is dropped like silence."""
    header = pb.GenerateHeader(messages=pb_messages(question_messages("hi")), payload_bytes=[1000],
                               sampling=common_pb2.SamplingParams(max_new_tokens=2))
    stop = threading.Event()

    def requests():
        yield pb.GenerateRequest(header=header)
        while not stop.wait(0.5):  # an empty chunk every half second, for ever
            yield pb.GenerateRequest(payload_chunk=b"")

    try:
        with pytest.raises(grpc.RpcError) as err:
            list(stub_of(decoder).Generate(requests(), timeout=60))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "VLSPLIT_STREAM_IDLE_S" in err.value.details()
    finally:
        stop.set()


def test_clients_that_vanish_cannot_exhaust_admission_and_time_out(decoder, tiny_models):
    channels = [grpc.insecure_channel(decoder.address) for _ in range(4)]
    vanished = [Vanished(llm_decoder_pb2_grpc.LLMDecoderStub(channels[i % 4])) for i in range(200)]
    try:
        # a request arriving after them is served at once
        header = pb.GenerateHeader(messages=pb_messages(question_messages("Hello?", 0)),
                                   sampling=common_pb2.SamplingParams(max_new_tokens=3))
        replies = list(stub_of(decoder).Generate(iter([pb.GenerateRequest(header=header)]), timeout=60))
        assert replies[-1].usage.completion_tokens >= 1
        # each silent call is dropped after VLSPLIT_STREAM_IDLE_S, and what it reserved is returned
        assert {v.code() for v in vanished} == {grpc.StatusCode.DEADLINE_EXCEEDED}
        assert decoder.metric("vlsplit_decoder_idle_streams_total") >= 200
        assert decoder.metric("vlsplit_decoder_payload_bytes_reserved") == 0
        assert decoder.metric("vlsplit_decoder_queue_depth") == 0
    finally:
        for v in vanished:
            v.silence.set()
        for channel in channels:
            channel.close()
