"""Continuous batching: one thread decodes every running generation together, one token per step.

A request is prefilled on its own (its image prefix possibly from the prefix cache) and then joins
the running batch at the next step boundary instead of waiting for the others to finish; finished
and cancelled rows leave at step boundaries. Rows of any lengths mix: each row is left-padded
(masked) to the batch's length and keeps its own M-RoPE positions, sampler and detokenizer.

Callers use `stream(request, cancelled)`: a blocking iterator of that request's TokenEvents, fed
by the scheduler thread (the servicer runs it in a worker thread, as it did `engine.generate`).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

from prometheus_client import Histogram

from .batch import Batch, Row, advance
from .detokenizer import Detokenizer
from .engine import DecoderEngine, GenerationRequest, TokenEvent, Usage
from .sampling import Sampler

log = logging.getLogger("vlsplit.decoder.scheduler")
BATCH_SIZE = Histogram("vlsplit_decoder_batch_size", "Sequences advanced by one decode step",
                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64))
_END = object()


@dataclass
class _Job:
    request: GenerationRequest
    out: queue.Queue
    cancelled: Callable[[], bool]


class Scheduler:
    def __init__(self, engine: DecoderEngine, max_batch: int):
        self.engine, self.max_batch = engine, max_batch
        self.inbox: queue.Queue[_Job] = queue.Queue()
        self.batch: Batch | None = None
        threading.Thread(target=self._run, name="decode-scheduler", daemon=True).start()

    def stream(self, request: GenerationRequest, cancelled: Callable[[], bool] = lambda: False,
               ) -> Iterator[TokenEvent]:
        out: queue.Queue = queue.Queue()
        self.inbox.put(_Job(request, out, cancelled))
        while (item := out.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    def _run(self) -> None:
        while True:
            self._admit(block=self.batch is None)
            if self.batch is not None:
                try:
                    self._step()
                except Exception as exc:  # noqa: BLE001 - a bug must not wedge every request
                    log.exception("decode step failed; failing the running batch")
                    for row in self.batch.rows:
                        row.emit(exc)
                    self.batch = None

    def _admit(self, block: bool) -> None:
        """Prefill waiting requests (all of them, up to max_batch rows) and add them to the batch."""
        while self.batch is None or len(self.batch.rows) < self.max_batch:
            try:
                job = self.inbox.get(block=block and self.batch is None)
            except queue.Empty:
                return
            try:
                self._join(job)
            except Exception as exc:  # noqa: BLE001 - validation, ModelMismatch, ...: that request only
                job.out.put(exc)

    def _join(self, job: _Job) -> None:
        engine, request = self.engine, job.request
        params = request.sampling.validate(engine.max_new_tokens_limit)
        prompt = engine.request_prompt(request)
        state, logits = engine.prefill(prompt, request.image_ids, request.warm)
        row = Row(0, Sampler(params), Detokenizer(engine.prompts.decode, params.stop), params.max_new_tokens,
                  Usage(len(prompt.ids), int(prompt.visual_mask.sum()), 0), state.next_positions, logits,
                  emit=job.out.put, cancelled=job.cancelled)
        if self.batch is None:
            self.batch = Batch(engine, [row], [state], prefix_len=0)
        else:
            self.batch.add(row, state)

    def _step(self) -> None:
        batch = self.batch
        keep, tokens = [], []
        for position, row in enumerate(batch.rows):
            if row.cancelled():
                row.emit(_END)
                continue
            token, event = advance(self.engine, row)
            row.emit(event)
            if event.finish_reason is None:
                keep.append(position)
                tokens.append(token)
        batch.keep(keep)
        if not batch.rows:
            self.batch = None
            return
        batch.trim()
        BATCH_SIZE.observe(len(batch.rows))
        batch.step(tokens)
