"""Decoder engine: ONLY the language weights, one scheduler, one step loop for every request.

    prepare(conversations, payloads | None, ...) -> SequenceGroup     intake.py: validate, tokenize, bound
    submit(request, sink)                                         queue it for admission
    engine thread: step() = schedule -> ModelRunner.run -> sample / score -> outputs to sinks

Generate, AskMany (many conversations about the same images), Classify and Moderate (checks with
labels) are all sequences in the same scheduler, advanced by the same step; `generate`,
`generate_batch` and `classify` are blocking conveniences over the same path (local-ask and the
tests use them). Nothing request-specific lives on the model: the KV is in the block pool.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from transformers import GenerationConfig

from shared.checkpoint import Checkpoint
from shared.codec import payload_size
from shared.config import EngineConfig, replace
from shared.errors import CheckpointError, Unavailable
from shared.fingerprint import compute_fingerprint, largest_image_tokens
from shared.payload import EmbeddingPayload
from shared.processor import PromptBuilder
from shared.schema import Message

from .block_manager import BlockManager, root_hash
from .grammar import GrammarCompiler, GrammarMask
from .intake import Intake
from .metrics import STEP_FAILURES, STEP_ROWS, STEP_SECONDS
from .model_runner import Chunk, ModelRunner
from .request import END, ClassificationGroup, GenerationGroup, LabelScore, NeedPayload, SequenceGroup, TokenEvent, Usage
from .sampling import SamplingParams, sample, token_logprobs
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence

log = logging.getLogger("vlsplit.decoder")

__all__ = ["DecoderEngine", "EngineConfig", "GenerationInput", "LabelScore", "NeedPayload", "TokenEvent", "Usage"]


@dataclass(frozen=True)
class GenerationInput:
    """One conversation (system prompt, images anywhere, several turns) to answer."""

    messages: list[Message]
    payloads: list[EmbeddingPayload]  # one per image part of `messages`, in order
    sampling: SamplingParams = SamplingParams()
    image_ids: tuple[str, ...] = ()  # content ids of the images (payloads carry theirs too)


@dataclass(frozen=True)
class StepRecord:
    seconds: float
    prefill: dict[int, int]  # sequence id -> prompt tokens computed
    decode: list[int]  # sequence ids that computed one token


@dataclass
class EngineStats:
    """What the engine did, for tests and benchmarks (the same numbers go to Prometheus)."""

    steps: int = 0
    records: deque = field(default_factory=lambda: deque(maxlen=10_000))  # StepRecord, newest last
    peak_blocks: int = 0  # most KV blocks referenced at once
    peak_committed: int = 0  # most blocks referenced + promised at once (never over the pool)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def wait(self, predicate, timeout: float = 120.0) -> bool:
        """Block until predicate(self) holds after some step (or timeout); True if it holds."""
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self), timeout)


class DecoderEngine:
    def __init__(self, checkpoint: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 config: EngineConfig | None = None, **overrides):
        start = time.perf_counter()
        self.config = replace(config or EngineConfig(), **overrides)
        self.checkpoint = Checkpoint(checkpoint)
        self.family = self.checkpoint.family
        self.dtype, self.device = dtype, torch.device(device)
        text = self.checkpoint.config.text_config
        self.max_len = min(self.config.max_model_len or text.max_position_embeddings, text.max_position_embeddings)
        self.runner = ModelRunner(self.checkpoint, dtype, self.device, self.config.kv_cache_bytes, self.config.block_size,
                                  packed_linear=self.config.packed_linear, quantize=self.config.quantize,
                                  decode_attention=self.config.decode_attention)
        self.merge_size: int = self.checkpoint.config.vision_config.spatial_merge_size
        self.prompts = PromptBuilder.from_pretrained(self.checkpoint.path, self.merge_size, self.family.video_prompt)
        self.eos_ids = _eos_ids(self.checkpoint.path, self.prompts.tokenizer)
        self.fingerprint = compute_fingerprint(self.checkpoint.path)
        self.hidden_size = text.hidden_size
        self.deepstack_levels = len(getattr(self.checkpoint.config.vision_config, "deepstack_visual_indexes", None) or [])
        root = root_hash(self.fingerprint, str(dtype), self.config.block_size)
        self.blocks = BlockManager(self.runner.pool.num_blocks, self.config.block_size, self.runner.pool.copy_block,
                                   caching=self.config.prefix_caching)
        grammars = GrammarCompiler(self.prompts.tokenizer, text.vocab_size, self.eos_ids, self.config.max_schema_bytes)
        self.grammar_mask = GrammarMask()
        self.intake = Intake(self.config, self.prompts, self.blocks, root, self.fingerprint, self.hidden_size,
                             self.deepstack_levels, self.eos_ids, self.max_len, self.device, dtype, grammars,
                             float(getattr(self.checkpoint.config.vision_config, "tokens_per_second", 0) or 0))
        self.scheduler = Scheduler(self.blocks, SchedulerConfig(self.config.max_batch, self.config.max_step_tokens,
                                                                self.config.max_queue))
        self.stats = EngineStats()
        self._closed = False
        self._step_started: float | None = None  # monotonic time the step in progress began (None: between steps)
        self._thread = threading.Thread(target=self._loop, name="decoder-engine", daemon=True)
        self._thread.start()
        _LIVE.add(self)
        log.info("decoder %s loaded in %.2fs (%s, %s, fingerprint %s, %d KV blocks of %d tokens)",
                 self.family.model_type, time.perf_counter() - start, dtype, device, self.fingerprint,
                 self.blocks.num_blocks, self.config.block_size)

    @property
    def max_new_tokens_limit(self) -> int:
        return self.config.max_new_tokens_limit

    @property
    def largest_request_payload(self) -> int:
        """The default limit of one request's payloads: see `default_payload_limit`."""
        return default_payload_limit(largest_image_tokens(self.checkpoint.path), self.hidden_size, self.deepstack_levels)

    def health(self) -> str | None:
        """Why this engine cannot serve, or None: its step loop has died, or one step has run longer than
        `step_stall_s` (a stuck kernel, a deadlock). The server turns health NOT_SERVING while it says so,
        so an orchestrator restarts it."""
        if self._closed:
            return None
        if not self._thread.is_alive():
            return "the decoder engine's step loop has died (see the log); restart the server"
        started, limit = self._step_started, self.config.step_stall_s
        if started is not None and limit > 0 and (held := time.monotonic() - started) > limit:
            return f"one engine step has run {held:.0f}s, over step_stall_s ({limit:g}s): stuck"
        return None

    def close(self) -> None:
        """Stop the step loop (after the step in progress); requests still queued get no more output."""
        self._closed = True
        self.scheduler.wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    # ---- requests ------------------------------------------------------------------------------

    def prepare(self, conversations: list[list[Message]], payloads: list[EmbeddingPayload] | None,
                sampling: SamplingParams | list[SamplingParams] = SamplingParams(),
                image_ids: tuple[str, ...] = (), labels: list[list[str]] | None = None,
                resume: tuple[int, ...] = (), cache_salt: str = "") -> SequenceGroup:
        """A validated request (see intake.py). Without payloads (None, or none with image ids) the
        images' KV must be cached, else NeedPayload. `resume`: the answer's first tokens (migration).
        `cache_salt`: the prefix cache's partition (a tenant); requests of other salts share no KV."""
        return self.intake.prepare(conversations, payloads, sampling, image_ids, labels, resume, cache_salt)

    def check_sampling(self, sampling: SamplingParams | list[SamplingParams]) -> None:
        """Refuse bad sampling values and response formats up front (before payloads are asked for)."""
        for params in sampling if isinstance(sampling, list) else [sampling]:
            self.intake.check_sampling(params)

    def check_payload(self, payload: EmbeddingPayload) -> None:
        self.intake.check_payload(payload)

    def submit(self, request: SequenceGroup, sink) -> SequenceGroup:
        """Queue a prepared request; outputs go to `sink` from the engine's thread (see request.py)."""
        request.sink = sink
        self.scheduler.add(request)
        return request

    def cancel(self, request: SequenceGroup) -> None:
        request.cancel()
        self.scheduler.wake()

    def stream(self, request: SequenceGroup) -> Iterator[object]:
        """Submit and yield the request's outputs (blocking); leaving early cancels it."""
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        self.submit(request, outputs.put)
        try:
            while (item := outputs.get()) is not END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel(request)

    def generate(self, request: GenerationInput) -> Iterator[TokenEvent]:
        """Stream tokens for one conversation. Greedy unless a temperature is given."""
        prepared = self.prepare([request.messages], request.payloads, request.sampling, request.image_ids)
        for _, event in self.stream(prepared):
            yield event

    def generate_batch(self, requests: list[GenerationInput]) -> Iterator[tuple[int, TokenEvent]]:
        """Stream (index, event) for conversations about the same images, as one request."""
        first = requests[0]
        prepared = self.prepare([r.messages for r in requests], first.payloads, [r.sampling for r in requests],
                                first.image_ids)
        yield from self.stream(prepared)

    def classify(self, request: GenerationInput, labels: list[str]) -> list[LabelScore]:
        """Scores for `labels` as answers to the conversation, most likely first."""
        [(_, scores)] = self.classify_many([request.messages], request.payloads, [labels], request.image_ids)
        return scores

    def classify_many(self, conversations: list[list[Message]], payloads: list[EmbeddingPayload] | None,
                      labels: list[list[str]], image_ids: tuple[str, ...] = ()) -> list[tuple[int, list[LabelScore]]]:
        prepared = self.prepare(conversations, payloads, image_ids=image_ids, labels=labels)
        return sorted(self.stream(prepared), key=lambda item: item[0])

    # ---- the step loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._closed:
                seen = self.scheduler.version
                try:
                    ran = self.step()
                except Exception as exc:  # noqa: BLE001 - a bug outside the forward: fail what is held, go on
                    log.exception("engine step failed outside the forward pass; failing every request it held")
                    self.scheduler.abort_all(exc)
                    ran = None
                if ran is None:  # nothing could run: sleep until a request arrives or is cancelled
                    self.scheduler.wait_for_change(seen, timeout=1.0)
        except BaseException as exc:  # the loop itself dies: nothing will answer what it holds, say so
            log.critical("the decoder engine's step loop died (%s: %s); health turns NOT_SERVING",
                         type(exc).__name__, exc)
            self.scheduler.abort_all(Unavailable(f"the decoder engine stopped ({type(exc).__name__}); retry elsewhere"))
            raise

    def step(self) -> StepRecord | None:
        """Advance every scheduled sequence once (engine thread only)."""
        start = time.perf_counter()
        chunks = self.scheduler.schedule()
        if not chunks:
            with self.stats.changed:  # e.g. a cancelled request was dropped
                self.stats.changed.notify_all()
            return None
        self.stats.peak_blocks = max(self.stats.peak_blocks, self.blocks.referenced)
        self.stats.peak_committed = max(self.stats.peak_committed, self.blocks.referenced + self.blocks.promised)
        self._prefetch_masks(chunks)
        self._step_started = time.monotonic()
        try:
            chunks, logits = self._forward(chunks)
            if not chunks:
                return None
            for chunk in chunks:
                self.scheduler.computed(chunk)
            self._outputs(chunks, logits)
        finally:
            self._step_started = None
        return self._record(chunks, time.perf_counter() - start)

    def _forward(self, chunks: list[Chunk]) -> tuple[list[Chunk], list]:
        """The step's forward. If it raises, each request's chunks run again alone, so only the request
        that triggers the failure fails (its client gets the error: INTERNAL for a bug of ours); the others'
        chunks and logits are returned as if the step had been split. A request alone that fails is aborted."""
        try:
            return chunks, self.runner.run(chunks)
        except Exception as exc:  # noqa: BLE001 - a bug must not take every request of the step down
            groups = {id(c.seq.request): [] for c in chunks}
            for c in chunks:
                groups[id(c.seq.request)].append(c)
            if len(groups) == 1:
                log.exception("engine step failed; failing its request (%d sequences)", len(chunks))
                self.scheduler.abort(chunks[0].seq.request, exc)
                STEP_FAILURES.labels("alone").inc()
                return [], []
            log.warning("engine step of %d requests failed (%s: %s); running each alone", len(groups),
                        type(exc).__name__, exc)
            STEP_FAILURES.labels("batch").inc()
        kept, logits = [], []
        for group in groups.values():
            try:
                out = self.runner.run(group)
            except Exception as exc:  # noqa: BLE001 - this request causes it: it alone fails
                log.exception("request failed alone in the engine step; failing it (%d sequences)", len(group))
                self.scheduler.abort(group[0].seq.request, exc)
                STEP_FAILURES.labels("alone").inc()
                continue
            kept.extend(group)
            logits.extend(out)
        return kept, logits

    def _prefetch_masks(self, chunks: list[Chunk]) -> None:
        """Constrained rows to be sampled this step: their grammar masks are filled during the forward."""
        rows = [c.seq.request.samplers[c.seq.index].matcher for c in chunks
                if c.wants_logits and isinstance(c.seq.request, GenerationGroup)]
        if any(m is not None for m in rows):
            self.grammar_mask.prefetch(rows, self.runner.lm_head.out_features)

    def _outputs(self, chunks: list[Chunk], logits: list[torch.Tensor | None]) -> None:
        ready = [(c.seq, x) for c, x in zip(chunks, logits) if x is not None]
        generating = [(seq, x) for seq, x in ready if isinstance(seq.request, GenerationGroup)]
        if generating:
            logits = torch.stack([x for _, x in generating])  # [rows, vocab]
            samplers = [seq.request.samplers[seq.index] for seq, _ in generating]
            tokens = sample(logits, samplers, [seq for seq, _ in generating], self.grammar_mask)
            logprobs = token_logprobs(logits, samplers, tokens)
            for (seq, _), token, lp in zip(generating, tokens, logprobs):
                self._safely(seq, lambda s=seq, t=token, lp=lp: s.request.on_token(s, t, lp) and self.scheduler.finish(s))
        for seq, x in ready:
            if isinstance(seq.request, ClassificationGroup):
                self._safely(seq, lambda s=seq, x=x: self._scored(s, x))

    def _scored(self, seq: Sequence, logits: torch.Tensor) -> None:
        request: ClassificationGroup = seq.request
        if seq.label < 0:
            for label, tokens in request.on_prompt(seq, logits):
                self.scheduler.fork(seq, tokens, label)
        else:
            request.on_label(seq, logits)
        self.scheduler.finish(seq)

    def _safely(self, seq: Sequence, action) -> None:
        if seq.request.cancelled:
            return
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - e.g. a sink that broke: that request only
            log.exception("request output failed")
            self.scheduler.abort(seq.request, exc)

    def _record(self, chunks: list[Chunk], seconds: float) -> StepRecord:
        prefill = {c.seq.id: c.n for c in chunks if c.end <= len(c.seq.prompt)}
        decode = [c.seq.id for c in chunks if c.seq.id not in prefill]
        record = StepRecord(seconds, prefill, decode)
        with self.stats.changed:
            self.stats.steps += 1
            self.stats.records.append(record)
            self.stats.changed.notify_all()
        kind = "mixed" if prefill and decode else "prefill" if prefill else "decode"
        STEP_SECONDS.labels(kind).observe(seconds)
        STEP_ROWS.observe(len(chunks))
        return record

    @property
    def prefilled_tokens(self) -> int:
        """Prompt tokens computed so far (tokens reused from cached blocks are not)."""
        return self.scheduler.prefilled


def default_payload_limit(largest_image_tokens: int, hidden: int, deepstack_levels: int) -> int:
    """One request's payload bytes by default: room for the float32 payload of the largest image
    the processor allows, and never less than 512 MiB."""
    return max(payload_size(largest_image_tokens, hidden, deepstack_levels), 512 << 20)


_LIVE: "weakref.WeakSet[DecoderEngine]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Let every step loop end before the interpreter tears torch down."""
    for engine in list(_LIVE):
        engine.close()


def _eos_ids(path: Path, tokenizer) -> frozenset[int]:
    try:
        eos = GenerationConfig.from_pretrained(path, local_files_only=True).eos_token_id
    except OSError:
        eos = None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise CheckpointError(f"{path}: no eos_token_id in generation_config.json or the tokenizer")
    return frozenset([eos] if isinstance(eos, int) else eos)
