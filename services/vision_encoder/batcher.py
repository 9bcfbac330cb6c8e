"""Dynamic batching: encode requests for different images share one vision-tower forward.

    submit(item, cost) -> queue -> the worker waits until the head job's window closes
        (max_wait after it arrived) or the batch is closed (max_batch jobs, or the next job would
        push the summed cost over max_cost) -> run([items]) in the engine thread -> each waiter
        gets its own result

The worker is one task on the event loop; `run` executes in the engine's single-thread executor,
so forwards stay serialized. Jobs that arrive while a forward runs queue up and, once it ends,
their window has usually passed already: they go together at once. A lone job on an idle engine
waits max_wait (0 turns waiting off: then only jobs that queued behind a busy engine batch up).
A job whose cost alone reaches max_cost runs alone, and immediately.

Failure isolation: items are validated before they are submitted (decoded, preprocessed), so a
batch should not fail; if one does anyway (out of memory, an engine bug), each job is run again
alone, so an error reaches only the request that causes it. A waiter that is cancelled is skipped.

Numerics (measured on CPU, fp32, sdpa, transformers 5.2, torch 2.13; solo vs batches of 2 to 5
images from 56x56 to 1000x300, both orders). The towers attend within each image only (cu_seqlens;
sdpa runs image by image, Qwen2.5's windows too) and every other op is row-wise, so a batch changes
an image's embeddings only where a CPU kernel's result depends on where a row sits in the tensor:
- tiny checkpoints, all three families: bit-identical (max abs difference 0.0, deepstack too).
- bench checkpoints (real widths): Qwen2-VL and Qwen3-VL bit-identical; Qwen2.5-VL differs by up
  to 1.7e-6 (values ~3: a few ulps). It starts in the MLP's SiLU: the CPU kernel splits its
  tensor into per-thread chunks, each with a vectorised body and a remainder, and an element next
  to a chunk boundary got a different last bit; the batch's size moves the boundaries. Greedy
  tokens from those embeddings were unchanged (15 of 15 generations of 32 tokens, bench decoder).
So the exact value cached for an image can depend on which images happened to share its forward
(timing), by float32 rounding; a near-tie in greedy decoding could then flip. encode_max_batch = 1
restores solo numerics exactly. GPUs were not measured (cuBLAS picks kernels by shape: expect the
same kind of last-bit differences there).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar

log = logging.getLogger("vlsplit.encoder")

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchLimits:
    max_batch: int = 8  # jobs per forward
    max_wait_s: float = 0.02  # how long the oldest waiting job waits for company
    max_cost: int = 65536  # summed cost (vision patches) per forward; a job over it runs alone

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_cost < 1 or self.max_wait_s < 0:
            raise ValueError(f"batch limits need max_batch >= 1, max_cost >= 1, max_wait_s >= 0: {self}")


@dataclass
class _Job(Generic[T, R]):
    item: T
    cost: int
    arrived: float  # loop time
    future: asyncio.Future[R] = field(repr=False)


class Batcher(Generic[T, R]):
    def __init__(self, run: Callable[[list[T]], list[R]], executor: Executor, limits: BatchLimits):
        self.run = run  # items -> one result per item, in order; called in `executor`
        self.executor = executor
        self.limits = limits
        self._pending: deque[_Job[T, R]] = deque()
        self._arrival = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._pending)

    async def submit(self, item: T, cost: int) -> R:
        """`run`'s result for `item`, computed in a batch with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        job = _Job(item, cost, loop.time(), loop.create_future())
        self._pending.append(job)
        self._arrival.set()
        if self._worker is None:
            self._worker = asyncio.ensure_future(self._work())
        return await job.future  # cancelling the caller cancels the future: the job is skipped

    async def _work(self) -> None:
        try:
            while self._pending:
                await self._dispatch(await self._gather())
        finally:
            self._worker = None  # reached with nothing pending, unless the worker itself was cancelled
            for job in self._pending:
                job.future.cancel()
            self._pending.clear()

    async def _gather(self) -> list[_Job[T, R]]:
        """Wait until the head job's window ends or the batch is closed; take the batch."""
        loop = asyncio.get_running_loop()
        deadline = self._pending[0].arrived + self.limits.max_wait_s
        while not self._plan()[1] and (remaining := deadline - loop.time()) > 0:
            self._arrival.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._arrival.wait()
        return [self._pending.popleft() for _ in range(self._plan()[0])]

    def _plan(self) -> tuple[int, bool]:
        """How many head jobs form the next batch, and whether it is closed (no later job fits)."""
        count = cost = 0
        for job in self._pending:
            if count == self.limits.max_batch or (count and cost + job.cost > self.limits.max_cost):
                return count, True
            count, cost = count + 1, cost + job.cost
        return count, count == self.limits.max_batch or cost >= self.limits.max_cost

    async def _dispatch(self, batch: list[_Job[T, R]]) -> None:
        batch = [job for job in batch if not job.future.done()]  # skip waiters cancelled meanwhile
        if not batch:
            return
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self.executor, self.run, [job.item for job in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} gave {len(results)} results")
        except asyncio.CancelledError:
            for job in batch:
                job.future.cancel()
            raise
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0].future, exc=exc)
                return
            log.warning("a batch of %d failed (%s: %s); running each alone", len(batch), type(exc).__name__, exc)
            for job in batch:
                await self._dispatch([job])
            return
        for job, result in zip(batch, results):
            _settle(job.future, result=result)


def _settle(future: asyncio.Future, result=None, exc: BaseException | None = None) -> None:
    if future.done():  # its waiter was cancelled during the forward
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
