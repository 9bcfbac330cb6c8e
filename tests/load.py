"""A steady stream of questions against a gateway, for tests that scale or break the stack under load."""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc

from conftest import make_image
from stack import ask_request
from test_encoder_service import wait_for
from vlsplit.v1 import gateway_pb2_grpc

WORKERS = 3
PAUSE_S = 0.1  # each worker's pause between questions: a steady load that leaves the CPU room for replicas to start
QUESTIONS = ("What is in this picture?", "Is there any text?", "What colours are there?")


class Stream:
    """WORKERS threads asking the gateway, PAUSE_S apart each: every third question is about a new image, the
    rest about images asked before (cache hits). The first answer per (image, question) is kept, and a
    later answer to the same question must be identical, whichever replicas served it."""

    def __init__(self, address: str, timeout_s: float = 90):
        self.timeout_s = timeout_s
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts = Counter()
        self.failed_by_code: Counter = Counter()
        self.errors: list[str] = []
        self.images: list[bytes] = []
        self.answers: dict[tuple[int, str], list[int]] = {}
        self.mismatches: list[tuple[int, str]] = []
        self.seq = itertools.count()
        self.pool = ThreadPoolExecutor(WORKERS)
        self.futures = [self.pool.submit(self._run) for _ in range(WORKERS)]

    def _next(self) -> tuple[int, bytes, str]:
        with self.lock:
            n = next(self.seq)
            if n % 3 == 0 or not self.images:
                self.images.append(make_image(64 + n % 48, 56 + n % 40, seed=10_000 + n))
                index = len(self.images) - 1
            else:
                index = n % len(self.images)
            return index, self.images[index], QUESTIONS[n % len(QUESTIONS)]

    def _run(self) -> None:
        while not self.stop.wait(PAUSE_S):
            index, data, question = self._next()
            with self.lock:
                self.counts["sent"] += 1
            try:
                answer = self.stub.Ask(ask_request(data, question, max_new_tokens=4), timeout=self.timeout_s)
            except grpc.RpcError as exc:
                with self.lock:
                    self.counts["failed"] += 1
                    self.failed_by_code[exc.code().name] += 1
                    self.errors.append(f"{exc.code().name}: {exc.details()}")
                continue
            with self.lock:
                self.counts["succeeded"] += 1
                first = self.answers.setdefault((index, question), list(answer.token_ids))
                if first != list(answer.token_ids):
                    self.mismatches.append((index, question))

    def succeeded(self) -> int:
        with self.lock:
            return self.counts["succeeded"]

    def wait_more(self, n: int, timeout_s: float = 120) -> None:
        target = self.succeeded() + n
        wait_for(lambda: self.succeeded() >= target or self.counts["failed"] > 0, timeout_s)

    def summary(self) -> str:
        by_code = ", ".join(f"{code} {n}" for code, n in sorted(self.failed_by_code.items())) or "none"
        return (f"sent {self.counts['sent']}, succeeded {self.counts['succeeded']}, failed {self.counts['failed']} "
                f"(by code: {by_code})")

    def close(self) -> Counter:
        self.stop.set()
        for future in self.futures:
            future.result(timeout=120)
        self.pool.shutdown()
        self.channel.close()
        return self.counts
