"""The LLM-decoder service as a real process over real gRPC.

Payloads are made in the test process by the vision engine and the codec, so the decoder is
checked on its own: exact tokens against the monolithic reference, typed errors for bad requests,
cancellation when the client goes away, bounded admission, and graceful shutdown.

Long generations use a text-only prompt that the tiny seed-0 Qwen3-VL checkpoint answers for
thousands of tokens without an end-of-sequence token; the tests that rely on that assert it.
"""

from __future__ import annotations

import math
import signal
import time
from functools import lru_cache

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from transformers import AutoTokenizer

from conftest import FAMILIES, make_image
from procs import Service
from reference import reference_inputs, reference_tokens
from services.model_builder import make_model
from services.llm_decoder.engine import DecoderEngine, GenerationInput
from shared.sampling import SamplingParams
from services.vision_encoder.engine import VisionEngine
from shared.codec import FORMAT_VERSION, encode_payload
from shared.hardware import cpu_features, usable_cpus
from shared.images import load_image
from shared.schema import question_messages
from shared.transfer import CHUNK_BYTES, chunks
from vlsplit.v1 import common_pb2, llm_decoder_pb2 as pb, llm_decoder_pb2_grpc

QUESTION = "What is in this picture?"
STEPS = 12
IMAGE = (200, 150, 0)  # (width, height, seed)
SECOND_IMAGE = (120, 160, 1)
LONG_FAMILY, LONG_QUESTION = "qwen3_vl", "What is in this picture?"  # text only: no EOS for 3000 tokens
LONG_STEPS = 3000
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CANCELLED = "vlsplit_decoder_cancelled_total"
RUNNING = "vlsplit_decoder_running"
QUEUE_DEPTH = "vlsplit_decoder_queue_depth"


# ---- fixtures ------------------------------------------------------------------------------------


def start_all(*services: Service) -> None:
    for service in services:
        service.start(wait=False)  # load in parallel
    for service in services:
        service.wait_serving()


@pytest.fixture(scope="module")
def decoders(tiny_models, tmp_path_factory):
    """One decoder process per family, shared by the module's tests."""
    log_dir = tmp_path_factory.mktemp("decoder-logs")
    services = {family: Service("decoder", "--model", tiny_models[family], log_dir=log_dir) for family in FAMILIES}
    try:
        start_all(*services.values())
        yield services
    finally:
        for service in services.values():
            service.kill()


@lru_cache(maxsize=None)
def vision(path: str) -> VisionEngine:
    return VisionEngine(path)


@lru_cache(maxsize=None)
def image(width: int, height: int, seed: int):
    return load_image(make_image(width, height, seed))


@lru_cache(maxsize=None)
def payload(path: str, spec: tuple[int, int, int] = IMAGE):
    [out] = vision(path).encode([image(*spec)])
    return out


def payload_bytes(path: str, spec: tuple[int, int, int] = IMAGE) -> bytes:
    return encode_payload(payload(path, spec), torch.float32)


# ---- client --------------------------------------------------------------------------------------


def header(question: str = QUESTION, n_images: int = 1, sizes: list[int] | None = None,
           **sampling) -> pb.GenerateRequest:
    sampling.setdefault("max_new_tokens", STEPS)
    content = [pb.ContentPart(image=pb.ImagePlaceholder()) for _ in range(n_images)]
    content.append(pb.ContentPart(text=question))
    return pb.GenerateRequest(header=pb.GenerateHeader(
        messages=[pb.ChatMessage(role="user", content=content)],
        payload_bytes=[] if sizes is None else sizes,
        sampling=common_pb2.SamplingParams(**sampling), request_id="test"))


def request_stream(payloads: list[bytes], question: str = QUESTION, chunk: int = CHUNK_BYTES,
                   **sampling) -> list[pb.GenerateRequest]:
    """A well-formed Generate stream: the header, then the concatenated payloads in chunks."""
    data = b"".join(payloads)
    return [header(question, len(payloads), [len(p) for p in payloads], **sampling),
            *(pb.GenerateRequest(payload_chunk=c) for c in chunks(data, chunk))]


def long_stream(max_new_tokens: int = LONG_STEPS) -> list[pb.GenerateRequest]:
    return request_stream([], LONG_QUESTION, max_new_tokens=max_new_tokens)


def stub(service: Service) -> llm_decoder_pb2_grpc.LLMDecoderStub:
    return llm_decoder_pb2_grpc.LLMDecoderStub(grpc.insecure_channel(service.address))


def generate(service: Service, requests: list[pb.GenerateRequest], timeout: float = 120) -> list[pb.GenerateResponse]:
    return list(stub(service).Generate(iter(requests), timeout=timeout))


def rpc_error(service: Service, requests: list[pb.GenerateRequest], timeout: float = 120) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        generate(service, requests, timeout)
    return info.value


def ids_of(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def wait_for(condition, what: str, timeout: float = 60) -> None:
    """Poll a (metric) condition until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@lru_cache(maxsize=None)
def local_tokens(path: str, question: str, max_new_tokens: int) -> list[int]:
    """Greedy ids of a text-only prompt from an in-process engine."""
    engine = DecoderEngine(path)
    request = GenerationInput(question_messages(question, 0), [], SamplingParams(max_new_tokens=max_new_tokens))
    return [e.token_id for e in engine.generate(request) if e.token_id is not None]


# ---- generation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_gives_the_reference_tokens(decoders, tiny_models, family):
    path = tiny_models[family]
    responses = generate(decoders[family], request_stream([payload_bytes(path)]))

    ids = ids_of(responses)
    assert ids == reference_tokens(path, [image(*IMAGE)], QUESTION, max_new_tokens=STEPS)
    text = "".join(r.text for r in responses)
    assert text == AutoTokenizer.from_pretrained(path).decode(ids, skip_special_tokens=True)
    *middle, last = responses
    assert all(r.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED and not r.HasField("usage") for r in middle)
    assert last.finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
    prompt_tokens = reference_inputs(path, [image(*IMAGE)], QUESTION)["input_ids"].shape[1]
    assert last.usage == common_pb2.Usage(prompt_tokens=prompt_tokens, image_tokens=payload(path).n_tokens,
                                          completion_tokens=len(ids))
    assert responses[0].ttft_ms > 0


def test_two_images_in_odd_chunks_give_the_reference_tokens(decoders, tiny_models):
    """Chunks that straddle the boundary between two payloads are reassembled exactly."""
    path = tiny_models["qwen2_5_vl"]
    payloads = [payload_bytes(path, IMAGE), payload_bytes(path, SECOND_IMAGE)]
    responses = generate(decoders["qwen2_5_vl"], request_stream(payloads, chunk=len(payloads[0]) // 3 + 7))
    expected = reference_tokens(path, [image(*IMAGE), image(*SECOND_IMAGE)], QUESTION, max_new_tokens=STEPS)
    assert ids_of(responses) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_model_info_names_the_local_engines_fingerprint(decoders, tiny_models, family):
    info = stub(decoders[family]).GetModelInfo(common_pb2.ModelInfoRequest(), timeout=30)
    assert (info.model_type, info.fingerprint, info.payload_format) == (
        family, vision(tiny_models[family]).fingerprint, FORMAT_VERSION)
    # pinned by the test session (VLSPLIT_DTYPE=float32): reported as chosen, with the threads and device it runs on
    assert (info.dtype, info.dtype_reason, info.quantize) == ("float32", "set explicitly", "off")
    assert info.torch_threads == usable_cpus() and info.device_name == cpu_features().describe()
    assert info.weight_bytes > 0


def test_reflection_lists_the_decoder_and_health(decoders):
    with grpc.insecure_channel(decoders["qwen2_vl"].address) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {"vlsplit.v1.LLMDecoder", "grpc.health.v1.Health"} <= set(services)


# ---- errors --------------------------------------------------------------------------------------


def test_payload_of_another_model_is_failed_precondition(decoders, tiny_models, tmp_path_factory):
    other = str(make_model(tmp_path_factory.mktemp("other") / "qwen2_vl", "qwen2_vl", "tiny", seed=1))
    theirs, ours = vision(other).fingerprint, vision(tiny_models["qwen2_vl"]).fingerprint
    assert theirs != ours

    error = rpc_error(decoders["qwen2_vl"], request_stream([payload_bytes(other)]))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert theirs in error.details() and ours in error.details()


def test_corrupt_payload_is_data_loss(decoders, tiny_models):
    data = bytearray(payload_bytes(tiny_models["qwen2_vl"]))
    data[len(data) // 2] ^= 0xFF  # inside the embedding bytes
    error = rpc_error(decoders["qwen2_vl"], request_stream([bytes(data)]))
    assert error.code() == grpc.StatusCode.DATA_LOSS
    assert "checksum" in error.details()


def chunk(data: bytes) -> pb.GenerateRequest:
    return pb.GenerateRequest(payload_chunk=data)


def bad_sampling(expected: str, **sampling):
    return lambda data: request_stream([data], **sampling), expected


def bad_messages(expected: str, *messages: pb.ChatMessage):
    def build(data: bytes):
        request = header(sizes=[len(data)])
        del request.header.messages[:]
        request.header.messages.extend(messages)
        return [request, chunk(data)]
    return build, expected


def user(*parts: pb.ContentPart, role: str = "user") -> pb.ChatMessage:
    return pb.ChatMessage(role=role, content=list(parts))


IMAGE_PART, TEXT_PART = pb.ContentPart(image=pb.ImagePlaceholder()), pb.ContentPart(text=QUESTION)

BAD_REQUESTS = {  # name: (data -> request messages, text the error must contain)
    "empty_stream": (lambda data: [], "first Generate message must be the header"),
    "chunk_before_header": (lambda data: [chunk(data), header(sizes=[len(data)])],
                            "first Generate message must be the header"),
    "two_sizes_one_image": (lambda data: [header(sizes=[len(data), len(data)]), chunk(data), chunk(data)],
                            "hold 1 images but payload_bytes lists 2"),
    "one_image_no_size": (lambda data: [header(sizes=[])], "hold 1 images but payload_bytes lists 0"),
    "more_bytes_than_announced": (lambda data: [header(sizes=[len(data)]), chunk(data + b"\0")],
                                  f"more payload bytes than the announced {{n}}"),
    "fewer_bytes_than_announced": (lambda data: [header(sizes=[len(data)]), chunk(data[:-1])],
                                   "announced {n}"),
    "second_header": (lambda data: [header(sizes=[len(data)]), header(sizes=[len(data)])],
                      "only payload_chunk messages may follow"),
    "zero_size": (lambda data: [header(sizes=[0])], "payload sizes must be positive"),
    "payloads_over_the_limit": (lambda data: [header(sizes=[600 << 20])], f"the limit is {512 << 20} bytes"),
    "too_many_images": (lambda data: [header(n_images=17, sizes=[len(data)] * 17)], "the limit is 16"),
    "negative_temperature": bad_sampling("temperature must be finite and >= 0", temperature=-1.0),
    "nan_temperature": bad_sampling("temperature must be finite and >= 0", temperature=math.nan),
    "top_p_over_one": bad_sampling("top_p must be in (0, 1]", top_p=2.0),
    "negative_top_k": bad_sampling("top_k must be >= 0", top_k=-1),
    "zero_max_new_tokens": bad_sampling("max_new_tokens must be >= 1", max_new_tokens=0),
    "max_new_tokens_over_the_limit": bad_sampling("exceeds the limit 4096", max_new_tokens=4097),
    "empty_stop_string": bad_sampling("stop strings must be non-empty", stop=[""]),
    "no_messages": bad_messages("messages must be a non-empty list"),
    "unknown_role": bad_messages("role must be one of", user(IMAGE_PART, TEXT_PART, role="robot")),
    "empty_content_part": bad_messages("neither text, image nor video", user(IMAGE_PART, pb.ContentPart())),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_is_invalid_argument(decoders, tiny_models, case):
    build, expected = BAD_REQUESTS[case]
    data = payload_bytes(tiny_models["qwen2_vl"])
    error = rpc_error(decoders["qwen2_vl"], build(data))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected.format(n=len(data)) in error.details()


def test_bytes_after_the_announced_payloads_are_invalid_argument(decoders):
    """Generation starts once the announced bytes are in; a later chunk aborts it."""
    decoder = decoders[LONG_FAMILY]
    cancelled_before = decoder.metric(CANCELLED)
    error = rpc_error(decoder, [*long_stream(), chunk(b"late")])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more payload bytes" in error.details()
    wait_for(lambda: decoder.metric(RUNNING) == 0, "the generation to stop")
    assert decoder.metric(CANCELLED) == cancelled_before  # an error, not a client going away


def test_server_still_serves_after_bad_requests(decoders, tiny_models):
    decoder, path = decoders["qwen2_vl"], tiny_models["qwen2_vl"]
    assert decoder.metric("vlsplit_requests_total", method="Generate", code="INVALID_ARGUMENT") >= 1
    assert decoder.metric("vlsplit_requests_total", method="Generate", code="INTERNAL") == 0
    assert decoder.health() == SERVING
    responses = generate(decoder, request_stream([payload_bytes(path)]))
    assert ids_of(responses) == reference_tokens(path, [image(*IMAGE)], QUESTION, max_new_tokens=STEPS)


def test_metrics_count_requests_tokens_and_ttft(decoders, tiny_models):
    decoder = decoders["qwen2_vl"]
    before = {name: decoder.metric(name) for name in
              ("vlsplit_generated_tokens_total", "vlsplit_ttft_seconds_count", "vlsplit_tokens_per_second_count")}
    ok_before = decoder.metric("vlsplit_requests_total", method="Generate", code="OK")
    responses = generate(decoder, request_stream([payload_bytes(tiny_models["qwen2_vl"])]))

    assert decoder.metric("vlsplit_generated_tokens_total") == before["vlsplit_generated_tokens_total"] + len(
        ids_of(responses))
    assert decoder.metric("vlsplit_ttft_seconds_count") == before["vlsplit_ttft_seconds_count"] + 1
    assert decoder.metric("vlsplit_tokens_per_second_count") == before["vlsplit_tokens_per_second_count"] + 1
    wait_for(lambda: decoder.metric("vlsplit_requests_total", method="Generate", code="OK") == ok_before + 1,
             "the finished call to be counted")
    assert decoder.metric("vlsplit_in_flight_requests", method="Generate") == 0


# ---- cancellation --------------------------------------------------------------------------------


def test_client_cancel_stops_the_generation(decoders, tiny_models):
    decoder = decoders[LONG_FAMILY]
    cancelled_before = decoder.metric(CANCELLED)
    call = stub(decoder).Generate(iter(long_stream()), timeout=300)
    first = next(call)
    assert first.token_ids and first.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED
    call.cancel()

    wait_for(lambda: decoder.metric(CANCELLED) == cancelled_before + 1, "the generation to be cancelled")
    wait_for(lambda: decoder.metric(RUNNING) == 0, "the running slot to be released")
    assert decoder.metric("vlsplit_requests_total", method="Generate", code="CANCELLED") >= 1
    path = tiny_models[LONG_FAMILY]
    assert ids_of(generate(decoder, request_stream([payload_bytes(path)]))) == reference_tokens(
        path, [image(*IMAGE)], QUESTION, max_new_tokens=STEPS)


# ---- admission -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_decoder(tiny_models, tmp_path_factory):
    """A decoder that runs one generation at a time and queues at most one more."""
    service = Service("decoder", "--model", tiny_models[LONG_FAMILY], log_dir=tmp_path_factory.mktemp("small"),
                      env={"VLSPLIT_MAX_BATCH": "1", "VLSPLIT_MAX_QUEUE": "1"})
    try:
        yield service.start()
    finally:
        service.kill()


def test_full_queue_answers_resource_exhausted(small_decoder, tiny_models):
    short = long_stream(max_new_tokens=STEPS)
    running = stub(small_decoder).Generate(iter(long_stream()), timeout=300)
    assert next(running).token_ids  # the one running slot is taken
    queued = stub(small_decoder).Generate(iter(short), timeout=300)
    wait_for(lambda: small_decoder.metric(QUEUE_DEPTH) == 1, "the second request to queue")

    error = rpc_error(small_decoder, short, timeout=60)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue full" in error.details() and "retry" in error.details()

    running.cancel()  # frees the slot: the queued request runs, then new ones are admitted again
    expected = local_tokens(tiny_models[LONG_FAMILY], LONG_QUESTION, STEPS)
    assert ids_of(queued) == expected
    wait_for(lambda: small_decoder.metric(RUNNING) == 0, "the slot to be released")
    assert ids_of(generate(small_decoder, short)) == expected
    assert small_decoder.metric(QUEUE_DEPTH) == 0


# ---- shutdown ------------------------------------------------------------------------------------


def test_sigterm_lets_the_in_flight_generation_finish(tiny_models, tmp_path):
    path, steps = tiny_models[LONG_FAMILY], 300
    decoder = Service("decoder", "--model", path, log_dir=tmp_path)
    try:
        decoder.start()
        channel = grpc.insecure_channel(decoder.address)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
        assert next(watch).status == SERVING
        call = llm_decoder_pb2_grpc.LLMDecoderStub(channel).Generate(iter(long_stream(steps)), timeout=120)
        responses = [next(call)]

        decoder.proc.send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING
        watch.cancel()  # an open Watch is an in-flight call too: it would hold the grace period
        responses += list(call)

        assert ids_of(responses) == local_tokens(path, LONG_QUESTION, steps)
        assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert responses[-1].usage.completion_tokens == steps
        assert decoder.proc.wait(timeout=60) == 0
    finally:
        decoder.kill()
