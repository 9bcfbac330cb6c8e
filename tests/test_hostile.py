"""Hostile input against a whole stack in real processes: hand-written malformed requests on every public
and internal RPC (tests/test_decoder_service.py holds ~20 more for the decoder's Generate stream), each
answered with its own status, never INTERNAL; no server dies; 1,000 bad requests later every
process's RSS is within 5 % of before."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import grpc
import psutil
import pytest
from PIL import Image

from conftest import make_image
from test_encoder_service import wait_for
from stack import Stack, image_ref
from test_decoder_service import header
from vlsplit.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, llm_decoder_pb2 as pb
from vlsplit.v1 import llm_decoder_pb2_grpc, vision_encoder_pb2 as enc, vision_encoder_pb2_grpc

SAMPLE = (Path(__file__).resolve().parent.parent / "docs" / "sample.png").read_bytes()
Q = "What is this?"


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's first bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def _image(width: int, height: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def ask(image=SAMPLE, question=Q, **sampling):
    sampling.setdefault("max_new_tokens", 4)
    return gateway_pb2.AskRequest(image=image_ref(image) if image is not None else gateway_pb2.ImageRef(),
                                  question=question, sampling=common_pb2.SamplingParams(**sampling))


def classify(labels, question=Q, image=SAMPLE):
    return gateway_pb2.ClassifyRequest(image=image_ref(image), question=question, labels=labels)


def check(question=Q, labels=("yes", "no")):
    return gateway_pb2.ModerationCheck(question=question, labels=list(labels))


# name: (service, method, request, expected code)
GATEWAY_CASES = {
    "ask_no_image": ("Ask", ask(None), "INVALID_ARGUMENT"),
    "ask_empty_bytes": ("Ask", ask(b""), "INVALID_ARGUMENT"),
    "ask_malformed_image_id": ("Ask", ask("not-a-sha256"), "INVALID_ARGUMENT"),
    "ask_unknown_image_id": ("Ask", ask("0" * 64), "NOT_FOUND"),
    "ask_empty_question": ("Ask", ask(question="   "), "INVALID_ARGUMENT"),
    "ask_question_over_the_limit": ("Ask", ask(question="x" * 9000), "INVALID_ARGUMENT"),
    "ask_garbage_bytes": ("Ask", ask(b"\x00garbage" * 50), "INVALID_ARGUMENT"),
    "ask_truncated_png": ("Ask", ask(SAMPLE[: len(SAMPLE) // 2]), "INVALID_ARGUMENT"),
    "ask_decompression_bomb": ("Ask", ask(_png_header_only(60000, 60000)), "INVALID_ARGUMENT"),
    "ask_aspect_ratio_300": ("Ask", ask(_image(900, 3)), "INVALID_ARGUMENT"),
    "ask_zero_max_new_tokens": ("Ask", ask(max_new_tokens=0), "INVALID_ARGUMENT"),
    "ask_huge_max_new_tokens": ("Ask", ask(max_new_tokens=10**6), "INVALID_ARGUMENT"),
    "ask_nan_temperature": ("Ask", ask(temperature=float("nan")), "INVALID_ARGUMENT"),
    "ask_top_p_5": ("Ask", ask(top_p=5.0), "INVALID_ARGUMENT"),
    "ask_negative_top_k": ("Ask", ask(top_k=-1), "INVALID_ARGUMENT"),
    "ask_stop_string_200kb": ("Ask", ask(stop=["s" * 200_000]), "INVALID_ARGUMENT"),
    "ask_100_stop_strings": ("Ask", ask(stop=[f"s{i}" for i in range(100)]), "INVALID_ARGUMENT"),
    "ask_empty_stop_string": ("Ask", ask(stop=[""]), "INVALID_ARGUMENT"),
    "ask_context_overflow": ("Ask", ask(max_new_tokens=4096, question="word " * 1500), "INVALID_ARGUMENT"),
    "stream_empty_question": ("AskStream", ask(question=""), "INVALID_ARGUMENT"),
    "many_no_questions": ("AskMany", gateway_pb2.AskManyRequest(image=image_ref(SAMPLE)), "INVALID_ARGUMENT"),
    "many_65_questions": ("AskMany", gateway_pb2.AskManyRequest(image=image_ref(SAMPLE), questions=["q"] * 65),
                          "INVALID_ARGUMENT"),
    "many_one_empty_question": ("AskMany", gateway_pb2.AskManyRequest(image=image_ref(SAMPLE), questions=["q", ""]),
                                "INVALID_ARGUMENT"),
    "classify_no_labels": ("Classify", classify([]), "INVALID_ARGUMENT"),
    "classify_65_labels": ("Classify", classify([f"l{i}" for i in range(65)]), "INVALID_ARGUMENT"),
    "classify_duplicate_labels": ("Classify", classify(["yes", "yes"]), "INVALID_ARGUMENT"),
    "classify_empty_label": ("Classify", classify(["yes", " "]), "INVALID_ARGUMENT"),
    "classify_label_too_long": ("Classify", classify(["yes", "word " * 100]), "INVALID_ARGUMENT"),
    "moderate_no_checks": ("Moderate", gateway_pb2.ModerateRequest(image=image_ref(SAMPLE)), "INVALID_ARGUMENT"),
    "moderate_65_checks": ("Moderate", gateway_pb2.ModerateRequest(image=image_ref(SAMPLE), checks=[check()] * 65),
                           "INVALID_ARGUMENT"),
    "moderate_check_without_labels": ("Moderate", gateway_pb2.ModerateRequest(image=image_ref(SAMPLE),
                                                                              checks=[check(labels=())]),
                                      "INVALID_ARGUMENT"),
    "upload_empty": ("UploadImage", gateway_pb2.UploadImageRequest(data=b""), "INVALID_ARGUMENT"),
    "upload_garbage": ("UploadImage", gateway_pb2.UploadImageRequest(data=b"GIF89a" + b"\xff" * 64),
                       "INVALID_ARGUMENT"),
}
ENCODER_CASES = {
    "encode_no_source": ("Encode", enc.EncodeRequest(), "INVALID_ARGUMENT"),
    "encode_malformed_id": ("Encode", enc.EncodeRequest(image_id="../../etc/passwd"), "INVALID_ARGUMENT"),
    "encode_unknown_id": ("Encode", enc.EncodeRequest(image_id="f" * 64), "NOT_FOUND"),
    "encode_garbage": ("Encode", enc.EncodeRequest(image=b"\x89PNG garbage"), "INVALID_ARGUMENT"),
    "encode_bomb": ("Encode", enc.EncodeRequest(image=_png_header_only(70000, 70000)), "INVALID_ARGUMENT"),
    "put_empty": ("PutImage", enc.PutImageRequest(image=b""), "INVALID_ARGUMENT"),
    "put_garbage": ("PutImage", enc.PutImageRequest(image=b"BM" + b"\0" * 40), "INVALID_ARGUMENT"),
}


def _classify_batch_without_labels():
    request = header(sizes=[])
    request.header.batch.add().messages.extend(request.header.messages)
    request.header.image_ids.append("a" * 64)
    return [request]


def _resume_in_a_batch():
    request = header(sizes=[])
    request.header.batch.add().messages.extend(request.header.messages)
    request.header.resume_token_ids.extend([1, 2])
    return [request]


DECODER_CASES = {  # (method, request messages, code)
    "classify_batch_header_without_labels": ("Classify", _classify_batch_without_labels(), "INVALID_ARGUMENT"),
    "generate_resume_in_a_batch": ("Generate", _resume_in_a_batch(), "INVALID_ARGUMENT"),
    "generate_no_messages": ("Generate", [pb.GenerateRequest(header=pb.GenerateHeader())], "INVALID_ARGUMENT"),
    "generate_garbage_payload": ("Generate", [header(sizes=[64]), pb.GenerateRequest(payload_chunk=b"\x07" * 64)],
                                 "DATA_LOSS"),
}


@pytest.fixture(scope="module")
def stack(tiny_models, tmp_path_factory):
    stack = Stack(tiny_models["qwen2_vl"], tmp_path_factory.mktemp("hostile"),
                  decoder_env={"VLSPLIT_STREAM_IDLE_S": "2", "VLSPLIT_MAX_MODEL_LEN": "1024"}).start()
    yield stack
    stack.stop()


def call(channel, stub_class, method: str, request) -> str:
    stub = stub_class(channel)
    try:
        result = getattr(stub, method)(request, timeout=60)
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def _all_cases(stack: Stack):
    for name, (method, request, code) in GATEWAY_CASES.items():
        yield name, stack.gateway.address, gateway_pb2_grpc.GatewayStub, method, request, code
    for name, (method, request, code) in ENCODER_CASES.items():
        yield name, stack.encoder.address, vision_encoder_pb2_grpc.VisionEncoderStub, method, request, code
    for name, (method, messages, code) in DECODER_CASES.items():
        yield name, stack.decoder.address, llm_decoder_pb2_grpc.LLMDecoderStub, method, iter(list(messages)), code


def test_malformed_requests_get_their_status_never_internal(stack):
    results = {}
    for name, address, stub_class, method, request, expected in _all_cases(stack):
        with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            results[name] = (call(channel, stub_class, method, request), expected)
    wrong = {name: got for name, (got, expected) in results.items() if got != expected}
    assert wrong == {}
    assert len(results) >= 40
    for service in (stack.gateway, stack.encoder, stack.decoder):
        assert service.metric("vlsplit_requests_total", code="INTERNAL") == 0
        assert service.health() == 1  # SERVING


def test_slowloris_payload_stream_is_dropped(stack):
    """A client announces a payload, sends a little, then stalls: dropped after VLSPLIT_STREAM_IDLE_S."""
    stall = __import__("threading").Event()

    def slow():
        yield header(sizes=[4096])
        yield pb.GenerateRequest(payload_chunk=b"\0" * 16)
        stall.wait(60)  # never sends the rest

    start = time.monotonic()
    with grpc.insecure_channel(stack.decoder.address) as channel:
        try:
            list(llm_decoder_pb2_grpc.LLMDecoderStub(channel).Generate(slow(), timeout=60))
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
    stall.set()
    assert code == "DEADLINE_EXCEEDED" and time.monotonic() - start < 30


def test_a_thousand_bad_requests_leave_memory_as_it_was(stack):
    cases = [c for c in _all_cases(stack) if c[0] not in ("ask_context_overflow",)]
    processes = {s.kind: psutil.Process(s.proc.pid) for s in (stack.gateway, stack.encoder, stack.decoder)}
    channels = {}

    def round_of(n: int) -> None:
        for i in range(n):
            name, address, stub_class, method, request, _ = cases[i % len(cases)]
            if name.startswith(("classify_batch", "generate_")):
                request = iter(list(DECODER_CASES[name][1]))
            channel = channels.setdefault(address, grpc.insecure_channel(
                address, options=[("grpc.max_send_message_length", 64 << 20)]))
            call(channel, stub_class, method, request)

    round_of(len(cases) * 2)  # warm-up: first-call allocations, caches
    before = {kind: p.memory_info().rss for kind, p in processes.items()}
    round_of(1000)
    after = {kind: p.memory_info().rss for kind, p in processes.items()}
    for channel in channels.values():
        channel.close()
    print("\nRSS before -> after 1,000 bad requests (MiB): " + ", ".join(
        f"{kind} {before[kind] / 2**20:.0f} -> {after[kind] / 2**20:.0f}" for kind in processes))
    for kind in processes:
        assert after[kind] <= before[kind] * 1.05, kind


def _gray16(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("I;16", (width, height), 40000).save(buf, format="PNG")
    return buf.getvalue()


def test_16_bit_grayscale_at_the_pixel_limit(stack):
    """The largest 16-bit image the default limits allow is decoded and stored; one row more is refused."""
    with grpc.insecure_channel(stack.gateway.address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        gateway = gateway_pb2_grpc.GatewayStub(ch)
        reply = gateway.UploadImage(gateway_pb2.UploadImageRequest(data=_gray16(8192, 8192)), timeout=120)
        assert len(reply.image_id) == 64
        assert call(ch, gateway_pb2_grpc.GatewayStub, "UploadImage",
                    gateway_pb2.UploadImageRequest(data=_gray16(8192, 8193))) == "INVALID_ARGUMENT"
    assert stack.encoder.health() == 1


def test_clients_that_leave_mid_answer_free_their_work(stack):
    """AskStream read for two messages, AskMany abandoned: the decoder stops their sequences."""
    decoder = stack.decoder
    cancelled = decoder.metric("vlsplit_decoder_cancelled_total")
    with grpc.insecure_channel(stack.gateway.address) as channel:
        gateway = gateway_pb2_grpc.GatewayStub(channel)
        stream = gateway.AskStream(ask(max_new_tokens=400), timeout=120)
        next(stream), next(stream)
        stream.cancel()
        many = gateway.AskMany.future(gateway_pb2.AskManyRequest(
            image=image_ref(SAMPLE), questions=[f"Question {i}?" for i in range(8)],
            sampling=common_pb2.SamplingParams(max_new_tokens=400)), timeout=120)
        wait_for(lambda: decoder.metric("vlsplit_decoder_running") >= 8)
        many.cancel()
    wait_for(lambda: decoder.metric("vlsplit_decoder_running") == 0)
    assert decoder.metric("vlsplit_decoder_cancelled_total") >= cancelled + 2
    assert decoder.health() == 1
