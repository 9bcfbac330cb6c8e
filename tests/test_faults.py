"""Faults injected under a steady stream of questions (real processes, real redis-server): the cache is
an optimisation, so Redis dying, coming back or stalling loses no request. Each test prints sent /
succeeded / failed by code. (An encoder SIGKILLed under load: tests/test_scaling.py; a decoder SIGKILLed
mid-answer: tests/test_migration.py; forged and corrupt cache entries: tests/test_signed_cache.py.)"""

from __future__ import annotations

import signal

import pytest

from load import Stream
from procs import Redis
from stack import Stack
from test_encoder_service import wait_for


@pytest.fixture(scope="module")
def stack(tiny_models, tmp_path_factory):
    """One stack for the module: each test leaves Redis serving again (that is what it asserts)."""
    stack = Stack(tiny_models["qwen2_vl"], tmp_path_factory.mktemp("faults")).start()
    yield stack
    stack.stop()


def hits(stack: Stack) -> float:
    return stack.gateway.metric("vlsplit_cache_requests_total", result="hit")


def test_redis_killed_and_restarted_under_load(stack):
    stream = Stream(stack.gateway.address, timeout_s=30)
    try:
        stream.wait_more(6)
        stack.redis.proc.send_signal(signal.SIGKILL)
        stack.redis.proc.wait(timeout=30)
        errors = stack.gateway.metric("vlsplit_cache_errors_total")
        stream.wait_more(6)  # answered without the cache
        # a new image's question reads the cache (repeated ones may not: the decoder holds their KV)
        wait_for(lambda: stack.gateway.metric("vlsplit_cache_errors_total") > errors, 120)
        stack.redis = Redis(stack.redis.port).start()  # back, empty, on the same address
        before = hits(stack)
        wait_for(lambda: hits(stack) > before, 120)  # the cache is used again, no restart of anything
        stream.wait_more(3)
    finally:
        stream.close()
    print(f"\nredis killed and restarted: {stream.summary()}")
    assert stream.counts["failed"] == 0, stream.errors[:5]
    assert stream.mismatches == []


def test_redis_stalled_under_load(stack):
    stream = Stream(stack.gateway.address, timeout_s=30)
    try:
        stream.wait_more(6)
        stack.redis.proc.send_signal(signal.SIGSTOP)  # up but silent: every call runs into its timeout
        try:
            errors = stack.gateway.metric("vlsplit_cache_errors_total")
            stream.wait_more(4)
            wait_for(lambda: stack.gateway.metric("vlsplit_cache_errors_total") > errors, 120)
        finally:
            stack.redis.proc.send_signal(signal.SIGCONT)
        before = hits(stack)
        wait_for(lambda: hits(stack) > before, 120)
    finally:
        stream.close()
    print(f"\nredis stalled (SIGSTOP) then resumed: {stream.summary()}")
    assert stream.counts["failed"] == 0, stream.errors[:5]
