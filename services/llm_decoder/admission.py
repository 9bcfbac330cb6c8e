"""Bounded admission: at most `max_concurrent` generations run, at most `max_queue` more wait.

A request beyond that is refused at once with `Overloaded` (RESOURCE_EXHAUSTED) rather than queued
without bound: the client (or the gateway's retry policy) backs off and tries again, possibly on
another replica. The continuous-batching scheduler will replace the semaphore; the contract (the
bounds and the error) stays.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

from vlsplit.shared.errors import Overloaded

from .metrics import QUEUE_DEPTH, RUNNING


class Slot:
    """A running slot. Released when its `async with` ends, or earlier by `release()` (idempotent),
    e.g. as soon as the worker thread of a cancelled generation has stopped."""

    def __init__(self, admission: "Admission"):
        self._admission = admission
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._release()


class Admission:
    def __init__(self, max_concurrent: int, max_queue: int):
        if max_concurrent < 1 or max_queue < 0:
            raise ValueError(f"max_concurrent must be >= 1 and max_queue >= 0, got {max_concurrent}, {max_queue}")
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        self.waiting = 0
        self.running = 0
        self._free = asyncio.Semaphore(max_concurrent)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        """Wait in the queue for a running slot; raise Overloaded at once if the queue is full."""
        if self._free.locked() and self.waiting >= self.max_queue:
            raise Overloaded(f"decoder queue full ({self.waiting} waiting, {self.running} running, "
                             f"limits {self.max_queue} waiting and {self.max_concurrent} running); "
                             "retry with backoff")
        self._wait(+1)
        try:
            await self._free.acquire()  # cancellation while queued leaves the queue cleanly
        finally:
            self._wait(-1)
        self.running += 1
        RUNNING.set(self.running)
        slot = Slot(self)
        try:
            yield slot
        finally:
            slot.release()

    def _wait(self, delta: int) -> None:
        self.waiting += delta
        QUEUE_DEPTH.set(self.waiting)

    def _release(self) -> None:
        self.running -= 1
        RUNNING.set(self.running)
        self._free.release()
