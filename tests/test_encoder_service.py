"""The vision-encoder service as a real process over real gRPC, with a real redis-server.

Encoder processes are module-scoped and shared by the tests; each test uses images no other test
uses (distinct seeds or sizes), so the cache state one test leaves never decides another.
"""

from __future__ import annotations

import asyncio
import json
import signal
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import make_image
from procs import Redis, Service
from services.vision_encoder.engine import VisionEngine
from services.vision_encoder.singleflight import SingleFlight
from shared.cache import embedding_key, image_key
from shared.codec import decode_payload
from shared.image_ids import image_id
from shared.images import load_image
from shared.version import PAYLOAD_FORMAT
from vlsplit.v1 import common_pb2, vision_encoder_pb2 as pb, vision_encoder_pb2_grpc

MiB = 1 << 20
MAX_IMAGE_BYTES = 2 * MiB  # the main encoder's limit (so "too large" needs only a small blob)
CACHE_TTL_S, IMAGE_TTL_S = 1200, 600
SERVING = health_pb2.HealthCheckResponse.SERVING
ENCODES = "vlsplit_encoder_encodes_total"


@dataclass
class Reply:
    info: "common_pb2.EmbeddingInfo"
    cache_hit: bool
    encode_ms: float
    blob: bytes
    chunk_sizes: list[int]


def collect(call) -> Reply:
    """Consume an Encode stream: the info message, then the payload chunks."""
    first, *rest = list(call)
    assert first.WhichOneof("part") == "info" and all(m.WhichOneof("part") == "chunk" for m in rest)
    blob = b"".join(m.chunk for m in rest)
    assert len(blob) == first.info.payload_bytes
    return Reply(first.info, first.cache_hit, first.encode_ms, blob, [len(m.chunk) for m in rest])


_STUBS: dict[str, vision_encoder_pb2_grpc.VisionEncoderStub] = {}


def stub(service: Service) -> vision_encoder_pb2_grpc.VisionEncoderStub:
    """One channel per server address for the whole module."""
    if service.address not in _STUBS:
        _STUBS[service.address] = vision_encoder_pb2_grpc.VisionEncoderStub(grpc.insecure_channel(service.address))
    return _STUBS[service.address]


def encode(service: Service, **source) -> Reply:
    return collect(stub(service).Encode(pb.EncodeRequest(**source), timeout=300))


def wait_for(condition, timeout_s: float = 60) -> None:
    """Poll `condition` (a metrics scrape: a few ms each) until true."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def gradient_png(side: int, shift: int = 0) -> bytes:
    """A side x side PNG that compresses well (a repeating pattern): tens of KB even at 3584.
    Different `shift`s give different images of one size."""
    import io

    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:side, 0:side]
    pixels = np.stack([x % 256, y % 256, (x // 16 + y // 16 + shift) % 256], -1).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def redis_server():
    server = Redis().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_client(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def encoder(tiny_models, redis_server, tmp_path_factory):
    """Qwen2-VL tiny, Redis cache, float32 payloads, a small byte limit."""
    service = Service("encoder", "--model", tiny_models["qwen2_vl"], "--redis", redis_server.url,
                      "--payload-dtype", "float32", log_dir=tmp_path_factory.mktemp("logs"),
                      env={"VLSPLIT_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES), "VLSPLIT_MAX_VIDEO_BYTES": str(MAX_IMAGE_BYTES),
                           "VLSPLIT_CACHE_TTL_S": str(CACHE_TTL_S), "VLSPLIT_IMAGE_TTL_S": str(IMAGE_TTL_S)})
    yield service.start()
    service.kill()


@pytest.fixture(scope="module")
def qwen3_encoder(tiny_models, tmp_path_factory):
    """Qwen3-VL tiny (deepstack), in-process cache, payload dtype left at its default."""
    service = Service("encoder", "--model", tiny_models["qwen3_vl"], "--redis", "memory",
                      log_dir=tmp_path_factory.mktemp("logs"))
    yield service.start()
    service.kill()


@pytest.fixture(scope="module")
def fingerprint(encoder) -> str:
    return stub(encoder).GetModelInfo(common_pb2.ModelInfoRequest()).fingerprint


# --- what Encode returns -------------------------------------------------------------------------


@pytest.mark.parametrize("which, family", [("encoder", "qwen2_vl"), ("qwen3_encoder", "qwen3_vl")])
def test_encode_equals_local_engine(request, tiny_models, which, family):
    service = request.getfixturevalue(which)
    data = make_image(320, 240, seed=101)
    reply = encode(service, image=data)
    local = VisionEngine(tiny_models[family]).encode([load_image(data)])[0]
    remote = decode_payload(reply.blob)
    assert torch.equal(remote.embeddings, local.embeddings)
    assert len(remote.deepstack) == len(local.deepstack) == (3 if family == "qwen3_vl" else 0)
    assert all(torch.equal(r, l) for r, l in zip(remote.deepstack, local.deepstack))
    assert remote.grid_thw == local.grid_thw and list(reply.info.grid_thw) == list(local.grid_thw)
    assert reply.info.image_id == image_id(data)
    assert reply.info.fingerprint == remote.fingerprint == local.fingerprint
    assert reply.info.n_tokens == local.n_tokens and reply.info.dtype == "float32"
    assert not reply.cache_hit and reply.encode_ms > 0
    assert all(0 < size <= MiB for size in reply.chunk_sizes)


def test_model_info(encoder, fingerprint):
    info = stub(encoder).GetModelInfo(common_pb2.ModelInfoRequest())
    assert (info.model_type, info.dtype, info.payload_format) == ("qwen2_vl", "float32", PAYLOAD_FORMAT)
    assert info.fingerprint == fingerprint
    assert (info.dtype_reason, info.quantize, info.backend) == ("set explicitly", "off", "torch")
    assert info.torch_threads >= 1 and info.weight_bytes > 0 and info.device_name


def test_second_encode_hits_cache(encoder, redis_client, fingerprint):
    data = make_image(200, 150, seed=102)
    first = encode(encoder, image=data)
    encodes = encoder.metric(ENCODES)
    hits = encoder.metric("vlsplit_cache_requests_total", result="hit")
    second = encode(encoder, image=data)
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert second.encode_ms == 0 and second.blob == first.blob
    assert encoder.metric(ENCODES) == encodes
    assert encoder.metric("vlsplit_cache_requests_total", result="hit") == hits + 1
    key = f"vlsplit:emb:v{PAYLOAD_FORMAT}:{{{fingerprint}:{image_id(data)}}}"
    assert key == embedding_key(fingerprint, image_id(data))
    assert redis_client.get(key) == first.blob
    assert CACHE_TTL_S - 60 < redis_client.ttl(key) <= CACHE_TTL_S


def test_cancelled_waiter_does_not_cancel_the_shared_encode(encoder):
    data = gradient_png(1536, shift=3)
    encodes = encoder.metric(ENCODES)
    client = stub(encoder)
    leader = client.Encode(pb.EncodeRequest(image=data), timeout=300)
    follower = client.Encode(pb.EncodeRequest(image=data), timeout=300)
    wait_for(lambda: encoder.metric("vlsplit_in_flight_requests", method="Encode") >= 2)
    leader.cancel()  # the client that started the encode goes away
    reply = collect(follower)
    assert not reply.cache_hit and reply.info.n_tokens > 0
    assert encoder.metric(ENCODES) == encodes + 1
    assert encode(encoder, image=data).cache_hit


def test_concurrent_misses_are_encoded_once(encoder):
    data = gradient_png(1024, shift=1)  # a while in the tower: the 8 calls overlap it
    encodes = encoder.metric(ENCODES)
    client = stub(encoder)
    calls = [client.Encode(pb.EncodeRequest(image=data), timeout=300) for _ in range(8)]  # all sent now
    replies = [collect(call) for call in calls]
    assert encoder.metric(ENCODES) == encodes + 1
    assert all(r.blob == replies[0].blob for r in replies)
    # Replies that joined the running flight report a miss; at least two did, or nothing overlapped.
    assert sum(not r.cache_hit for r in replies) >= 2


# --- image ids and the upload store --------------------------------------------------------------


def test_put_image_then_encode_by_id(encoder, redis_client):
    data = make_image(180, 120, seed=104)
    put = stub(encoder).PutImage(pb.PutImageRequest(image=data))
    assert (put.image_id, put.ttl_seconds, put.width, put.height) == (image_id(data), IMAGE_TTL_S, 180, 120)
    assert IMAGE_TTL_S - 60 < redis_client.ttl(image_key(put.image_id)) <= IMAGE_TTL_S
    by_id = encode(encoder, image_id=put.image_id)
    assert not by_id.cache_hit and by_id.info.image_id == put.image_id
    assert encode(encoder, image=data).blob == by_id.blob  # same image, same cache entry


def test_expired_upload_is_not_found(encoder, redis_client):
    data = make_image(180, 120, seed=105)
    put = stub(encoder).PutImage(pb.PutImageRequest(image=data))
    redis_client.delete(image_key(put.image_id))  # what expiry does
    error = rpc_error(lambda: encode(encoder, image_id=put.image_id))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert put.image_id in error.details() and "send the image bytes again" in error.details()


def test_encoded_image_id_outlives_its_upload(encoder, redis_client):
    data = make_image(180, 120, seed=106)
    put = stub(encoder).PutImage(pb.PutImageRequest(image=data))
    encode(encoder, image_id=put.image_id)
    redis_client.delete(image_key(put.image_id))
    assert encode(encoder, image_id=put.image_id).cache_hit  # embeddings cached: no bytes needed


def test_unknown_image_id_is_not_found(encoder):
    error = rpc_error(lambda: encode(encoder, image_id="0" * 64))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "send the image bytes again" in error.details()


@pytest.mark.parametrize("bad_id", ["", "abc", "A" * 64, "g" * 64, "0" * 63, "0" * 65, "../" + "0" * 61])
def test_malformed_image_id_is_invalid(encoder, bad_id):
    error = rpc_error(lambda: encode(encoder, image_id=bad_id))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "64 lowercase hex" in error.details()


def test_request_without_source_is_invalid(encoder):
    error = rpc_error(lambda: encode(encoder))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "image_id" in error.details()


# --- bad images ----------------------------------------------------------------------------------


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def huge_png_header(width: int = 50000, height: int = 50000) -> bytes:
    """A valid PNG signature and IHDR declaring width x height RGB, and one tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


BAD_IMAGES = {
    "empty": (b"", "empty image"),
    "not_an_image": (b"this is plain text, not pixels" * 10, "not an image"),
    "truncated_png": (make_image(256, 256, seed=107)[:3000], "cannot decode image"),
    "declares_50000x50000": (huge_png_header(), f"limit is {8192 * 8192} pixels"),
    "over_max_bytes": (b"\x89PNG" + b"\x00" * (MAX_IMAGE_BYTES + 1), f"the limit is {MAX_IMAGE_BYTES} bytes"),
}


@pytest.mark.parametrize("rpc", ["Encode", "PutImage"])
@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_is_invalid_argument(encoder, rpc, case):
    data, message = BAD_IMAGES[case]
    if rpc == "Encode":
        error = rpc_error(lambda: encode(encoder, image=data))
    else:
        error = rpc_error(lambda: stub(encoder).PutImage(pb.PutImageRequest(image=data), timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert message in error.details()
    assert encoder.health() == SERVING
    assert encoder.metric("vlsplit_requests_total", method=rpc, code="INTERNAL") == 0


def test_message_over_grpc_limit_is_resource_exhausted(encoder):
    data = b"\x00" * (MAX_IMAGE_BYTES + 2 * MiB)  # over max(image, video bytes) + 1 MiB: gRPC itself refuses it
    error = rpc_error(lambda: encode(encoder, image=data))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert encoder.health() == SERVING


# --- the cache: corruption, outage, in-process backend -------------------------------------------


def _flip_last_byte(blob: bytes) -> bytes:
    return blob[:-1] + bytes([blob[-1] ^ 0xFF])


@pytest.mark.parametrize("corrupt, seed", [(lambda blob: b"garbage", 108), (_flip_last_byte, 109)],
                         ids=["garbage", "flipped_byte"])
def test_corrupt_cache_entry_is_recomputed(encoder, redis_client, fingerprint, corrupt, seed):
    data = make_image(160, 160, seed=seed)
    good = encode(encoder, image=data)
    key = embedding_key(fingerprint, image_id(data))
    redis_client.set(key, corrupt(good.blob), ex=CACHE_TTL_S)
    encodes = encoder.metric(ENCODES)
    corrupted = encoder.metric("vlsplit_cache_requests_total", result="corrupt")
    again = encode(encoder, image=data)
    assert not again.cache_hit and again.blob == good.blob
    assert encoder.metric(ENCODES) == encodes + 1
    assert encoder.metric("vlsplit_cache_requests_total", result="corrupt") == corrupted + 1
    assert redis_client.get(key) == good.blob  # the entry is valid again
    decode_payload(redis_client.get(key))


def test_redis_outage_serves_without_cache_then_recovers(encoder, redis_server):
    data = make_image(140, 140, seed=110)
    errors = encoder.metric("vlsplit_cache_errors_total")
    redis_server.stop()
    try:
        down = [encode(encoder, image=data) for _ in range(2)]
        assert not any(r.cache_hit for r in down)
        assert encoder.metric("vlsplit_cache_errors_total") > errors
        assert encoder.metric("vlsplit_cache_requests_total", result="error") > 0
        assert encoder.health() == SERVING
    finally:
        redis_server.start()  # same port: the store reconnects on its next command
    first, second = encode(encoder, image=data), encode(encoder, image=data)
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert second.blob == down[0].blob


def test_put_image_fails_unavailable_while_redis_is_down(encoder, redis_server):
    redis_server.stop()
    try:
        error = rpc_error(lambda: stub(encoder).PutImage(pb.PutImageRequest(image=make_image(64, 64, seed=111))))
    finally:
        redis_server.start()
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "send the image bytes" in error.details()


def test_memory_backend_caches(qwen3_encoder):
    data = make_image(150, 100, seed=112)
    first, second = encode(qwen3_encoder, image=data), encode(qwen3_encoder, image=data)
    assert (first.cache_hit, second.cache_hit) == (False, True) and second.blob == first.blob
    put = stub(qwen3_encoder).PutImage(pb.PutImageRequest(image=make_image(90, 90, seed=113)))
    assert not encode(qwen3_encoder, image_id=put.image_id).cache_hit


# --- large payloads ------------------------------------------------------------------------------


def test_deepstack_payload_over_4_mib_crosses_in_chunks(qwen3_encoder):
    """Qwen3-VL, 2048x2048: 4096 tokens x 64 wide x (1 + 3 deepstack levels) in float32."""
    reply = encode(qwen3_encoder, image=gradient_png(2048))
    assert list(reply.info.grid_thw) == [1, 128, 128] and reply.info.n_tokens == 4096
    assert reply.info.payload_bytes > 4 * MiB and max(reply.chunk_sizes) <= MiB
    payload = decode_payload(reply.blob)
    assert payload.embeddings.shape[0] == 4096 and len(payload.deepstack) == 3


def test_largest_image_the_processor_allows(encoder, tiny_models):
    """Qwen2-VL's max_pixels (12845056 = 3584 x 3584): 16384 tokens, a payload over 4 MiB."""
    settings = json.loads((Path(tiny_models["qwen2_vl"]) / "preprocessor_config.json").read_text())
    max_pixels = settings["max_pixels"]
    assert max_pixels == 3584 * 3584
    reply = encode(encoder, image=gradient_png(3584))
    assert list(reply.info.grid_thw) == [1, 256, 256] and reply.info.n_tokens == 16384
    assert reply.info.payload_bytes > 4 * MiB and max(reply.chunk_sizes) <= MiB
    assert decode_payload(reply.blob).embeddings.shape[0] == 16384


# --- lifecycle -----------------------------------------------------------------------------------


def test_serving_after_start(encoder, qwen3_encoder):
    assert encoder.health() == SERVING and qwen3_encoder.health() == SERVING


def test_sigterm_drains_finishes_the_in_flight_encode_then_stops(tiny_models, tmp_path):
    """SIGTERM: NOT_SERVING at once, new calls still answered for drain_s (balancers notice), the call in
    flight when the signal came finished (not dropped), then exit 0; a second SIGTERM ends the drain early
    (the drain here is far longer than the test runs)."""
    service = Service("encoder", "--model", tiny_models["qwen2_5_vl"], "--redis", "memory", log_dir=tmp_path,
                      env={"VLSPLIT_DRAIN_S": "600", "VLSPLIT_GRACE_S": "60"}).start()
    try:
        with grpc.insecure_channel(service.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=120)
            assert next(watch).status == SERVING
            in_flight = stub(service).Encode(pb.EncodeRequest(image=gradient_png(1024, shift=2)), timeout=300)
            wait_for(lambda: service.metric("vlsplit_in_flight_requests", method="Encode") >= 1)  # it arrived
            service.proc.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING  # at once
            watch.cancel()
        reply = encode(service, image=gradient_png(96, shift=5))  # a new call during the drain is served
        assert reply.info.n_tokens > 0 and service.proc.poll() is None
        reply = collect(in_flight)
        assert reply.info.n_tokens > 0 and len(reply.blob) == reply.info.payload_bytes
        service.proc.send_signal(signal.SIGTERM)  # skip the rest of the drain
        assert service.proc.wait(timeout=60) == 0
        assert "draining: health NOT_SERVING" in service.log_path.read_text()
    finally:
        service.kill()


# --- single-flight, in process -------------------------------------------------------------------


class Work:
    """Work that runs until released, counting its runs."""

    def __init__(self, result="done"):
        self.runs, self.result = 0, result
        self.started, self.release = asyncio.Event(), asyncio.Event()

    async def __call__(self):
        self.runs += 1
        self.started.set()
        await self.release.wait()
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def test_single_flight_shares_one_run_and_its_result():
    async def main():
        flights, work = SingleFlight(), Work()
        waiters = [asyncio.create_task(flights.do("k", work)) for _ in range(5)]
        await work.started.wait()
        assert flights.running("k")
        work.release.set()
        assert await asyncio.gather(*waiters) == ["done"] * 5
        assert work.runs == 1 and not flights.running("k")
    asyncio.run(main())


def test_single_flight_shares_the_error():
    async def main():
        flights, work = SingleFlight(), Work(result=ValueError("bad image"))
        waiters = [asyncio.create_task(flights.do("k", work)) for _ in range(3)]
        await work.started.wait()
        work.release.set()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(r, ValueError) and str(r) == "bad image" for r in results) and work.runs == 1
    asyncio.run(main())


def test_single_flight_survives_cancelled_waiters():
    async def main():
        flights, work = SingleFlight(), Work()
        first = asyncio.create_task(flights.do("k", work))
        second = asyncio.create_task(flights.do("k", work))
        await work.started.wait()
        first.cancel()
        work.release.set()
        assert await second == "done"
        assert first.cancelled() and work.runs == 1
        # Every waiter gone: the work still finishes, and then the key is free again.
        alone, lonely = SingleFlight(), Work()
        waiter = asyncio.create_task(alone.do("k", lonely))
        await lonely.started.wait()
        waiter.cancel()
        await asyncio.wait([waiter])
        assert alone.running("k")  # nobody waits, the work runs on
        fresh = Work(result="fresh")
        fresh.release.set()
        lonely.release.set()
        assert await alone.do("k", fresh) == "done"  # joined the surviving work, not a new run
        assert (lonely.runs, fresh.runs) == (1, 0) and not alone.running("k")
    asyncio.run(main())
