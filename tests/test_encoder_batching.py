"""Dynamic batching in the vision encoder: different images share one tower forward.

Engine level: a batch's embeddings equal solo encodes (CPU, fp32), per family. They were
bit-identical for the tiny checkpoints when measured; the check allows float32 rounding (TOLERANCE)
because a CPU kernel's last bit can depend on where a row sits in the batch (batcher.py: 1.7e-6 at
Qwen2.5-VL's real widths), which varies with the machine's vector width and thread count.
Batcher level: the grouping policy, with a fake forward that blocks until released (no sleeps).
Service level: one real encoder process whose batches close when full (4 images) long before its
max-wait window (5 s) ends, so concurrent requests are grouped deterministically.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from conftest import FAMILIES, make_image
from procs import Service
from services.vision_encoder.batcher import Batcher, BatchLimits
from services.vision_encoder.engine import VisionEngine
from services.vision_encoder.server import _check
from shared.codec import decode_payload
from shared.config import EncoderConfig, load
from shared.images import load_image
from shared.payload import EmbeddingPayload
from vlsplit.v1 import vision_encoder_pb2 as pb, vision_encoder_pb2_grpc

ENCODES = "vlsplit_encoder_encodes_total"
BATCHES, BATCHED = "vlsplit_encoder_batch_size_count", "vlsplit_encoder_batch_size_sum"


TOLERANCE = 1e-5  # absolute, on values of order 1-3: six times the largest difference measured


def same(a: EmbeddingPayload, b: EmbeddingPayload) -> bool:
    def close(x: torch.Tensor, y: torch.Tensor) -> bool:
        return x.shape == y.shape and torch.allclose(x, y, rtol=0, atol=TOLERANCE)
    return (a.grid_thw == b.grid_thw and close(a.embeddings, b.embeddings)
            and len(a.deepstack) == len(b.deepstack) and all(map(close, a.deepstack, b.deepstack)))


# --- engine: a batch equals solo encodes ---------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_embeddings_equal_solo_embeddings(tiny_models, family):
    engine = VisionEngine(tiny_models[family])
    images = [load_image(make_image(w, h, seed=s)) for w, h, s in [(320, 240, 301), (56, 56, 302), (600, 200, 303)]]
    batched = engine.encode(images)
    solo = [engine.encode([image])[0] for image in images]
    assert len({p.grid_thw for p in solo}) == 3  # three different patch grids in one forward
    assert all(same(b, s) for b, s in zip(batched, solo))
    assert same(engine.encode(images[::-1])[0], solo[2])  # position in the batch does not matter


# --- the batcher's policy ------------------------------------------------------------------------


class Tower:
    """A fake forward, in the engine thread: records its batches; `hold()` makes the next one wait."""

    def __init__(self):
        self.batches: list[list[str]] = []
        self.started, self.release = threading.Event(), threading.Event()
        self.release.set()

    def hold(self) -> None:
        self.started.clear()
        self.release.clear()

    def __call__(self, items: list[str]) -> list[str]:
        self.batches.append(items)
        self.started.set()
        self.release.wait(timeout=60)
        if "bad" in items:
            raise ValueError("bad item")
        return [item.upper() for item in items]


def run_batcher(scenario, **limits):
    """asyncio.run(scenario(batcher, tower)) with a one-thread executor, as the encoder has."""
    tower = Tower()
    with ThreadPoolExecutor(max_workers=1) as executor:
        async def main():
            return await scenario(Batcher(tower, executor, BatchLimits(**limits)), tower)
        return asyncio.run(main()), tower.batches


def test_waiting_jobs_form_batches_of_at_most_max_batch():
    async def scenario(batcher, tower):
        return await asyncio.gather(*(batcher.submit(c, cost=1) for c in "abcdef"))
    results, batches = run_batcher(scenario, max_batch=3, max_wait_s=60)  # full batches never wait
    assert results == list("ABCDEF") and batches == [list("abc"), list("def")]


def test_patch_bound_splits_batches_and_an_oversized_job_runs_alone():
    async def scenario(batcher, tower):
        costs = {"a": 4, "b": 4, "c": 4, "huge": 30, "e": 2, "f": 8}
        return await asyncio.gather(*(batcher.submit(item, cost) for item, cost in costs.items()))
    results, batches = run_batcher(scenario, max_batch=8, max_wait_s=60, max_cost=10)
    assert results == ["A", "B", "C", "HUGE", "E", "F"]
    assert batches == [["a", "b"], ["c"], ["huge"], ["e", "f"]]  # 8, 4, 30 alone, 10


def test_jobs_arriving_while_the_tower_is_busy_run_together_next():
    async def scenario(batcher, tower):
        tower.hold()
        first = asyncio.create_task(batcher.submit("first", cost=1))
        await asyncio.to_thread(tower.started.wait, 60)  # the tower is busy with "first"
        later = [asyncio.create_task(batcher.submit(c, cost=1)) for c in "xyz"]
        while len(batcher) < 3:
            await asyncio.sleep(0)  # let the three submits enqueue (event-loop turns, not time)
        tower.release.set()
        return await asyncio.gather(first, *later)
    results, batches = run_batcher(scenario, max_batch=8, max_wait_s=0)
    assert results == ["FIRST", "X", "Y", "Z"] and batches == [["first"], list("xyz")]


def test_lone_job_runs_when_its_window_ends():
    async def scenario(batcher, tower):
        return await batcher.submit("alone", cost=1)
    assert run_batcher(scenario, max_batch=8, max_wait_s=0.01) == ("ALONE", [["alone"]])


def test_failed_batch_fails_only_the_job_that_causes_it():
    async def scenario(batcher, tower):
        return await asyncio.gather(*(batcher.submit(c, cost=1) for c in ["a", "bad", "c"]),
                                    return_exceptions=True)
    (a, bad, c), batches = run_batcher(scenario, max_batch=3, max_wait_s=60)
    assert (a, c) == ("A", "C") and isinstance(bad, ValueError)
    assert batches == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]  # the batch, then each alone


def test_cancelled_waiter_is_left_out_of_the_batch():
    async def scenario(batcher, tower):
        tower.hold()
        first = asyncio.create_task(batcher.submit("first", cost=1))
        await asyncio.to_thread(tower.started.wait, 60)
        gone, kept = (asyncio.create_task(batcher.submit(c, cost=1)) for c in ("gone", "kept"))
        while len(batcher) < 2:
            await asyncio.sleep(0)
        gone.cancel()
        tower.release.set()
        return await asyncio.gather(first, kept)
    results, batches = run_batcher(scenario, max_batch=8, max_wait_s=0)
    assert results == ["FIRST", "KEPT"] and batches == [["first"], ["kept"]]


def test_batch_limits_come_from_the_environment_and_are_checked(tiny_models):
    env = {"VLSPLIT_ENCODE_MAX_BATCH": "4", "VLSPLIT_ENCODE_MAX_WAIT_MS": "2.5",
           "VLSPLIT_ENCODE_MAX_BATCH_PATCHES": "1024"}
    config = load(EncoderConfig, {"model": tiny_models["qwen2_vl"]}, environ=env)
    assert (config.encode_max_batch, config.encode_max_wait_ms, config.encode_max_batch_patches) == (4, 2.5, 1024)
    _check(config)
    with pytest.raises(ValueError, match="VLSPLIT_ENCODE_MAX_BATCH=0: must be >= 1"):
        load(EncoderConfig, {"model": tiny_models["qwen2_vl"]}, environ={"VLSPLIT_ENCODE_MAX_BATCH": "0"})


# --- the service: concurrent Encodes ---------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder(tiny_models, tmp_path_factory):
    """Qwen2-VL tiny, in-process cache; a batch closes at 4 images, or 5 s after its first one."""
    service = Service("encoder", "--model", tiny_models["qwen2_vl"], "--redis", "memory",
                      log_dir=tmp_path_factory.mktemp("logs"),
                      env={"VLSPLIT_ENCODE_MAX_BATCH": "4", "VLSPLIT_ENCODE_MAX_WAIT_MS": "5000"})
    yield service.start()
    service.kill()


@pytest.fixture(scope="module")
def engine(tiny_models) -> VisionEngine:
    return VisionEngine(tiny_models["qwen2_vl"])


def encode_together(service: Service, images: list[bytes]) -> list:
    """Send every Encode before reading any reply; one payload (or the RpcError) per image."""
    with grpc.insecure_channel(service.address) as channel:
        client = vision_encoder_pb2_grpc.VisionEncoderStub(channel)
        calls = [client.Encode(pb.EncodeRequest(image=data), timeout=120) for data in images]
        return [_outcome(call) for call in calls]


def _outcome(call):
    try:
        first, *rest = list(call)
    except grpc.RpcError as exc:
        return exc
    assert not first.cache_hit
    return decode_payload(b"".join(m.chunk for m in rest))


def solo(engine: VisionEngine, data: bytes) -> EmbeddingPayload:
    return engine.encode([load_image(data)])[0]


def counters(service: Service) -> tuple[float, float, float]:
    return service.metric(ENCODES), service.metric(BATCHES), service.metric(BATCHED)


def test_concurrent_encodes_of_different_images_share_one_forward(encoder, engine):
    images = [make_image(w, h, seed=s) for w, h, s in [(320, 240, 311), (120, 90, 312), (400, 64, 313), (64, 64, 314)]]
    before = counters(encoder)
    payloads = encode_together(encoder, images)
    assert counters(encoder) == (before[0] + 4, before[1] + 1, before[2] + 4)  # 4 images, one forward
    assert all(same(p, solo(engine, data)) for p, data in zip(payloads, images))


def test_bad_image_among_concurrent_encodes_fails_only_its_own_request(encoder, engine):
    good = [make_image(150, 100 + 10 * k, seed=320 + k) for k in range(4)]
    before = counters(encoder)
    outcomes = encode_together(encoder, [*good[:2], b"not an image at all", *good[2:]])
    bad = outcomes.pop(2)
    assert isinstance(bad, grpc.RpcError) and bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not an image" in bad.details()
    assert counters(encoder) == (before[0] + 4, before[1] + 1, before[2] + 4)  # the 4 good ones, together
    assert all(same(p, solo(engine, data)) for p, data in zip(outcomes, good))


def test_duplicates_in_flight_with_other_images_are_encoded_once(encoder, engine):
    a, b, c, d = (make_image(200, 120, seed=330 + k) for k in range(4))
    before = counters(encoder)
    outcomes = encode_together(encoder, [a, b, a, c, a, d])
    assert counters(encoder) == (before[0] + 4, before[1] + 1, before[2] + 4)  # a once, in one forward of 4
    expected = [solo(engine, data) for data in (a, b, a, c, a, d)]
    assert all(same(p, e) for p, e in zip(outcomes, expected))
