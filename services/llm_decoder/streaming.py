"""One generation run in a worker thread and consumed on the event loop as an async iterator.

The engine's loop is blocking torch code, so it runs in a thread (torch releases the GIL); each
`TokenEvent` crosses to the loop through an asyncio queue (`call_soon_threadsafe`). An exception in
the thread (validation, ModelMismatch, CorruptPayload, ...) is re-raised on the loop as it is, so
the interceptor maps it to its status code. `cancel()` sets the flag the engine polls between
tokens: the thread stops within one token.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Executor
from typing import AsyncIterator, Callable, Iterator

from .engine import TokenEvent
from .metrics import CANCELLED

Produce = Callable[[Callable[[], bool]], Iterator[TokenEvent]]  # cancelled flag -> events
_END = object()


class ThreadedGeneration:
    def __init__(self, produce: Produce, executor: Executor):
        self._cancelled = threading.Event()
        self._failed = False  # stopped by `fail`, not by the client going away
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.future: asyncio.Future = self._loop.run_in_executor(executor, self._work, produce)

    def cancel(self) -> None:
        self._cancelled.set()

    def fail(self, exc: BaseException) -> None:
        """Stop the generation and end the stream with `exc` (e.g. the client broke the protocol)."""
        self._failed = True
        self.cancel()
        self._queue.put_nowait(exc)

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while (item := await self._queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def _work(self, produce: Produce) -> None:
        finished = False
        try:
            if not self._cancelled.is_set():
                for event in produce(self._cancelled.is_set):
                    finished = event.finish_reason is not None
                    self._put(event)
            if not finished and not self._failed:
                CANCELLED.inc()
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, raised there
            self._put(exc)

    def _put(self, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the process is exiting, nobody is listening
            pass
