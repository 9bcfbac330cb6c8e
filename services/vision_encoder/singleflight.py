"""In-process single-flight: concurrent calls for one key share one execution of the work.

The first caller for a key starts the work as its own task; later callers for the same key, while
it runs, await that task instead of starting another. Every waiter gets the same result or the
same exception. The work is shielded from its waiters: a waiter that is cancelled (its client went
away, its deadline passed) stops waiting, but the work runs on for the others, and when every
waiter has gone it still finishes (so its result reaches the cache). Once the work is done the key
is forgotten: the next call starts afresh (callers look in the cache first).

Scope is one process (one event loop). Across encoder replicas, `replica_flight.py` adds a Redis lock
per cache key on top of this: one replica encodes a new image, the others wait for its cache entry.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._running: dict[K, asyncio.Task[V]] = {}

    def running(self, key: K) -> bool:
        """Whether work for `key` is under way now (a `do` for it would join, not start)."""
        return key in self._running

    def __len__(self) -> int:
        return len(self._running)

    async def do(self, key: K, work: Callable[[], Awaitable[V]]) -> V:
        """Result of `work()`, run once for all concurrent callers with the same `key`."""
        task = self._running.get(key)
        if task is None:
            task = asyncio.ensure_future(work())
            self._running[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        # shield: cancelling this waiter cancels only its wait, never the shared task.
        return await asyncio.shield(task)

    def _finished(self, key: K, task: asyncio.Task[V]) -> None:
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: when every waiter left, nobody else reads it
