"""Cross-replica single flight: encoder processes sharing one Redis encode a new image once.

Replica A is made to hold the lock for a while deterministically: its batcher waits
`encode_max_wait_ms` for company before a lone image's forward, so it is still inside its flight
when B and C are asked for the same image."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from procs import Redis, Service
from test_encoder_service import encode, gradient_png, wait_for


@pytest.fixture
def redis_server():
    server = Redis().start()
    yield server
    server.stop()


def replica(tiny_models, redis_server, tmp_path, name: str, wait_ms: int, lock_s: float) -> Service:
    return Service("encoder", "--model", tiny_models["qwen2_vl"], "--redis", redis_server.url,
                   log_dir=tmp_path,
                   env={"VLSPLIT_ENCODE_MAX_WAIT_MS": str(wait_ms), "VLSPLIT_ENCODE_LOCK_S": str(lock_s)})


def encodes(service: Service) -> float:
    return service.metric("vlsplit_encoder_encodes_total")


def start_replicas(tiny_models, redis_server, tmp_path, a_wait_ms: int, lock_s: float) -> list[Service]:
    """Replicas A (its lone image waits `a_wait_ms` for company), B and C, started side by side."""
    services = [replica(tiny_models, redis_server, tmp_path, "a", wait_ms=a_wait_ms, lock_s=lock_s),
                *(replica(tiny_models, redis_server, tmp_path, n, wait_ms=0, lock_s=lock_s) for n in "bc")]
    for service in services:
        service.start(wait=False)
    for service in services:
        service.wait_serving()
    return services


def test_three_replicas_encode_a_new_image_once(tiny_models, redis_server, tmp_path):
    services = a, b, c = start_replicas(tiny_models, redis_server, tmp_path, a_wait_ms=3000, lock_s=30)
    try:
        image = gradient_png(300, shift=11)
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(encode, a, image=image)
            wait_for(lambda: a.metric("vlsplit_encoder_replica_locks_held") == 1)  # A is in its flight
            others = [pool.submit(encode, s, image=image) for s in (b, c)]
            replies = [first.result(), *(f.result() for f in others)]

        assert [encodes(s) for s in services] == [1, 0, 0]  # one vision forward in all
        assert len({r.blob for r in replies}) == 1
        assert sum(s.metric("vlsplit_encoder_replica_waits_total", outcome="shared") for s in (b, c)) == 2
    finally:
        for service in services:
            service.kill()


# Opt-in: by default the same takeover runs under a steady stream in tests/test_scaling.py (its third encoder
# is SIGKILLed while it holds an image's lock; another encoder takes the image over once the lock expires).
@pytest.mark.slow
def test_a_replica_takes_over_when_the_holder_dies(tiny_models, redis_server, tmp_path):
    services = a, b, c = start_replicas(tiny_models, redis_server, tmp_path, a_wait_ms=600_000, lock_s=1)  # A never finishes
    try:
        image = gradient_png(300, shift=12)
        with ThreadPoolExecutor(3) as pool:
            pool.submit(encode, a, image=image)  # fails when A is killed; its result is not awaited
            wait_for(lambda: a.metric("vlsplit_encoder_replica_locks_held") == 1)
            others = [pool.submit(encode, s, image=image) for s in (b, c)]
            a.proc.send_signal(signal.SIGKILL)
            replies = [f.result() for f in others]

        assert encodes(b) + encodes(c) == 1  # one survivor took over after the lock expired
        assert replies[0].blob == replies[1].blob
        assert sum(s.metric("vlsplit_encoder_replica_waits_total", outcome="took_over") for s in (b, c)) >= 1
    finally:
        for service in services:
            service.kill()
