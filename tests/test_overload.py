"""Overload: four times the sustainable rate for 10 s against a real stack. What cannot be admitted is
refused with RESOURCE_EXHAUSTED at once (p99 of the refusals printed and bounded), what was admitted
finishes with the right answer, and every process's peak RSS stays bounded (printed)."""

from __future__ import annotations

import threading
import time

import grpc
import psutil
import pytest

from stack import Stack, ask_request
from vlsplit.v1 import gateway_pb2_grpc

from pathlib import Path

SAMPLE = (Path(__file__).resolve().parent.parent / "docs" / "sample.png").read_bytes()
DURATION_S = 10  # hundreds of requests at 4x the rate: enough to fill the queue and refuse the rest
PROBE_S = 3  # the closed-loop measurement of the sustainable rate
TOKENS = 16


def test_four_times_the_sustainable_rate_for_10_s(tiny_models, tmp_path):
    # a decoder that runs 2 answers at once and lets 2 more wait: the rest must be refused, not queued
    stack = Stack(tiny_models["qwen2_vl"], tmp_path,
                  decoder_env={"VLSPLIT_MAX_BATCH": "2", "VLSPLIT_MAX_QUEUE": "2"}).start()
    try:
        stub = stack.stub
        expected = list(stub.Ask(ask_request(SAMPLE, "What is this?", max_new_tokens=TOKENS), timeout=60).token_ids)
        # sustainable rate: closed loop, two clients (the decoder's batch)
        done = 0
        start = time.monotonic()

        def closed_loop():
            nonlocal done
            while time.monotonic() - start < PROBE_S:
                stub.Ask(ask_request(SAMPLE, "What is this?", max_new_tokens=TOKENS), timeout=60)
                done += 1

        loops = [threading.Thread(target=closed_loop) for _ in range(2)]
        for thread in loops:
            thread.start()
        for thread in loops:
            thread.join()
        sustainable = done / (time.monotonic() - start)
        rate = 4 * sustainable

        processes = {s.kind: psutil.Process(s.proc.pid) for s in (stack.gateway, stack.encoder, stack.decoder)}
        base = {kind: p.memory_info().rss for kind, p in processes.items()}
        peak = dict(base)
        results: list[tuple[str, float, list[int]]] = []
        lock = threading.Lock()
        sampling = threading.Event()

        def sample_rss():
            while not sampling.wait(0.2):
                for kind, p in processes.items():
                    peak[kind] = max(peak[kind], p.memory_info().rss)

        def done_callback(future, sent_at):
            elapsed = time.monotonic() - sent_at
            try:
                reply = future.result()
                outcome = ("OK", elapsed, list(reply.token_ids))
            except grpc.RpcError as exc:
                outcome = (exc.code().name, elapsed, [])
            with lock:
                results.append(outcome)

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        begin = time.monotonic()
        sent = 0
        while (now := time.monotonic()) - begin < DURATION_S:  # open loop: requests keep coming regardless
            due = begin + sent / rate
            if now < due:
                time.sleep(due - now)
            sent_at = time.monotonic()
            future = stub.Ask.future(ask_request(SAMPLE, "What is this?", max_new_tokens=TOKENS), timeout=60)
            future.add_done_callback(lambda f, t=sent_at: done_callback(f, t))
            sent += 1
        deadline = time.monotonic() + 90
        while len(results) < sent:
            assert time.monotonic() < deadline, f"{sent - len(results)} requests never finished"
            time.sleep(0.05)
        sampling.set()
    finally:
        stack.stop()

    codes = {code: sum(1 for c, _, _ in results if c == code) for code in {c for c, _, _ in results}}
    refused = sorted(elapsed for code, elapsed, _ in results if code == "RESOURCE_EXHAUSTED")
    p99 = refused[int(0.99 * (len(refused) - 1))] if refused else 0.0
    print(f"\noverload: sustainable {sustainable:.1f}/s, offered {rate:.1f}/s for {DURATION_S} s: sent {sent}, "
          f"{codes}; refusal p50 {refused[len(refused) // 2] * 1000 if refused else 0:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms; peak RSS (MiB) " +
          ", ".join(f"{kind} {base[kind] / 2**20:.0f} -> {peak[kind] / 2**20:.0f}" for kind in peak))
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes.get("RESOURCE_EXHAUSTED", 0) > 0 and codes.get("OK", 0) > 0
    assert all(tokens == expected for code, _, tokens in results if code == "OK")
    assert p99 < 0.25  # refused at once: no queueing behind the work
    for kind in peak:
        assert peak[kind] < base[kind] * 1.5 + (64 << 20), kind
