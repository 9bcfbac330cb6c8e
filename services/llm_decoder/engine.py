"""Decoder engine: ONLY the language weights, one scheduler, one step loop for every request.

    prepare(conversations, payloads | None, ...) -> Request     validate, tokenize, bound (caller's thread)
    submit(request, sink)                                         queue it for admission
    engine thread: step() = schedule -> ModelRunner.run -> sample / score -> outputs to sinks

Generate, AskMany (many conversations about the same images), Classify and Moderate (checks with
labels) are all sequences in the same scheduler, advanced by the same step; `generate`,
`generate_batch` and `classify` are blocking conveniences over the same path (local-ask and the
tests use them). Nothing request-specific lives on the model: the KV is in the block pool.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import queue
import threading
import time
import uuid
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from transformers import GenerationConfig

from vlsplit.shared.checkpoint import Checkpoint
from vlsplit.shared.codec import payload_size, validate_payload
from vlsplit.shared.config import EngineConfig
from vlsplit.shared.errors import CheckpointError, CorruptPayload, InvalidRequest, ModelMismatch, TooLarge
from vlsplit.shared.fingerprint import compute_fingerprint, largest_image_tokens
from vlsplit.shared.payload import EmbeddingPayload
from vlsplit.shared.processor import Message, PromptBuilder, validate_messages

from .block_manager import BlockManager, root_hash
from .detokenizer import Detokenizer
from .metrics import STEP_ROWS, STEP_SECONDS
from .model_runner import Chunk, ModelRunner
from .positions import mrope_positions
from .request import END, ClassifyRequest, GenerateRequest, LabelScore, NeedPayload, Request, TokenEvent, Usage
from .sampling import Sampler, SamplingParams, sample
from .scheduler import Scheduler, SchedulerConfig
from .sequence import ImageSpan, Prompt, Sequence

log = logging.getLogger("vlsplit.decoder")
MAX_REMEMBERED_IMAGES = 100_000  # image_id -> grid entries kept for warm starts (a few MB)

__all__ = ["DecoderEngine", "EngineConfig", "GenerationRequest", "LabelScore", "NeedPayload", "TokenEvent", "Usage"]


@dataclass(frozen=True)
class GenerationRequest:
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
        self.config = dataclasses.replace(config or EngineConfig(), **overrides)
        self.checkpoint = Checkpoint(checkpoint)
        self.family = self.checkpoint.family
        self.dtype, self.device = dtype, torch.device(device)
        text = self.checkpoint.config.text_config
        self.max_len = min(self.config.max_model_len or text.max_position_embeddings, text.max_position_embeddings)
        self.runner = ModelRunner(self.checkpoint, dtype, self.device, self.config.kv_cache_bytes, self.config.block_size)
        self.merge_size: int = self.checkpoint.config.vision_config.spatial_merge_size
        self.prompts = PromptBuilder.from_pretrained(self.checkpoint.path, self.merge_size)
        self.eos_ids = _eos_ids(self.checkpoint.path, self.prompts.tokenizer)
        self.fingerprint = compute_fingerprint(self.checkpoint.path)
        self.hidden_size = text.hidden_size
        self.deepstack_levels = len(getattr(self.checkpoint.config.vision_config, "deepstack_visual_indexes", None) or [])
        self.vision_end_id = self.prompts.tokenizer.convert_tokens_to_ids("<|vision_end|>")
        self.root = root_hash(self.fingerprint, str(dtype), self.config.block_size)
        self.blocks = BlockManager(self.runner.pool.num_blocks, self.config.block_size, self.runner.pool.copy_block,
                                   caching=self.config.prefix_caching)
        self.scheduler = Scheduler(self.blocks, SchedulerConfig(self.config.max_batch, self.config.max_step_tokens,
                                                                self.config.max_queue))
        self.image_grids: OrderedDict[str, tuple[int, int, int]] = OrderedDict()  # image_id -> grid, for warm starts
        self.stats = EngineStats()
        self._closed = False
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

    @property
    def request_block_limit(self) -> int:
        return min(self.config.max_request_blocks or self.blocks.num_blocks, self.blocks.num_blocks)

    def close(self) -> None:
        """Stop the step loop (after the step in progress); requests still queued get no more output."""
        self._closed = True
        self.scheduler.wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    # ---- requests ------------------------------------------------------------------------------

    def prepare(self, conversations: list[list[Message]], payloads: list[EmbeddingPayload] | None,
                sampling: SamplingParams | list[SamplingParams] = SamplingParams(),
                image_ids: tuple[str, ...] = (), labels: list[list[str]] | None = None) -> Request:
        """A validated request. Without payloads (None, or none with image ids) the images' KV must
        be cached, else NeedPayload."""
        if not payloads and image_ids:
            payloads = None
        kind = "check" if labels is not None else "conversation"
        limit = self.config.max_checks if labels is not None else self.config.max_rows
        if not conversations:
            raise InvalidRequest(f"at least one {kind} is required")
        if len(conversations) > limit:
            raise TooLarge(f"{len(conversations)} {kind}s in one request; the limit is {limit} "
                           f"({'VLSPLIT_MAX_CHECKS' if labels is not None else 'VLSPLIT_MAX_ROWS'})")
        images = self._image_count(conversations)
        # what needs no image is checked before any payload is asked for
        if labels is not None:
            if len(labels) != len(conversations):
                raise InvalidRequest(f"{len(conversations)} checks but {len(labels)} label lists")
            label_ids = [self._tokenize_labels(check) for check in labels]
        else:
            params = sampling if isinstance(sampling, list) else [sampling] * len(conversations)
            params = [self._validate_sampling(p) for p in params]
        grids, keys, embeddings, deepstack = self._images(images, payloads, image_ids)
        prompts = [self._prompt(c, grids, keys, embeddings, deepstack) for c in conversations]
        if labels is not None:
            request = self._classify_request(prompts, labels, label_ids)
        else:
            request = self._generate_request(prompts, params)
        self._check_blocks(request)
        if payloads is None:
            self._check_cached(request)
        return request

    def submit(self, request: Request, sink) -> Request:
        """Queue a prepared request; outputs go to `sink` from the engine's thread (see request.py)."""
        request.sink = sink
        self.scheduler.add(request)
        return request

    def cancel(self, request: Request) -> None:
        request.cancel()
        self.scheduler.wake()

    def stream(self, request: Request) -> Iterator[object]:
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

    def generate(self, request: GenerationRequest) -> Iterator[TokenEvent]:
        """Stream tokens for one conversation. Greedy unless a temperature is given."""
        prepared = self.prepare([request.messages], request.payloads, request.sampling, request.image_ids)
        for _, event in self.stream(prepared):
            yield event

    def generate_batch(self, requests: list[GenerationRequest]) -> Iterator[tuple[int, TokenEvent]]:
        """Stream (index, event) for conversations about the same images, as one request."""
        first = requests[0]
        prepared = self.prepare([r.messages for r in requests], first.payloads, [r.sampling for r in requests],
                                first.image_ids)
        yield from self.stream(prepared)

    def classify(self, request: GenerationRequest, labels: list[str]) -> list[LabelScore]:
        """Scores for `labels` as answers to the conversation, most likely first."""
        [(_, scores)] = self.classify_many([request.messages], request.payloads, [labels], request.image_ids)
        return scores

    def classify_many(self, conversations: list[list[Message]], payloads: list[EmbeddingPayload] | None,
                      labels: list[list[str]], image_ids: tuple[str, ...] = ()) -> list[tuple[int, list[LabelScore]]]:
        prepared = self.prepare(conversations, payloads, image_ids=image_ids, labels=labels)
        return sorted(self.stream(prepared), key=lambda item: item[0])

    # ---- the step loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._closed:
            seen = self.scheduler.version
            if self.step() is None:  # nothing could run: sleep until a request arrives or is cancelled
                self.scheduler.wait_for_change(seen, timeout=1.0)

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
        try:
            logits = self.runner.run(chunks)
        except Exception as exc:  # noqa: BLE001 - a bug must not wedge every request: fail this step's
            log.exception("engine step failed; failing its %d sequences' requests", len(chunks))
            for request in {id(c.seq.request): c.seq.request for c in chunks}.values():
                self.scheduler.abort(request, exc)
            return None
        for chunk in chunks:
            self.scheduler.computed(chunk)
        self._outputs(chunks, logits)
        return self._record(chunks, time.perf_counter() - start)

    def _outputs(self, chunks: list[Chunk], logits: list[torch.Tensor | None]) -> None:
        ready = [(c.seq, x) for c, x in zip(chunks, logits) if x is not None]
        generating = [(seq, x) for seq, x in ready if isinstance(seq.request, GenerateRequest)]
        if generating:
            tokens = sample(torch.stack([x for _, x in generating]),
                            [seq.request.samplers[seq.index] for seq, _ in generating])
            for (seq, _), token in zip(generating, tokens):
                self._safely(seq, lambda s=seq, t=token: s.request.on_token(s, t) and self.scheduler.finish(s))
        for seq, x in ready:
            if isinstance(seq.request, ClassifyRequest):
                self._safely(seq, lambda s=seq, x=x: self._scored(s, x))

    def _scored(self, seq: Sequence, logits: torch.Tensor) -> None:
        request: ClassifyRequest = seq.request
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

    # ---- building requests ---------------------------------------------------------------------

    def _image_count(self, conversations: list[list[Message]]) -> int:
        for conversation in conversations:
            validate_messages(conversation)
        counts = {sum(isinstance(m["content"], list) and part.get("type") == "image"
                      for m in c for part in (m["content"] if isinstance(m["content"], list) else []))
                  for c in conversations}
        if len(counts) != 1:
            raise InvalidRequest("every conversation of a request must hold the same images")
        images = counts.pop()
        if images > self.config.max_images:
            raise TooLarge(f"the messages hold {images} images; the limit is {self.config.max_images} "
                           "(VLSPLIT_MAX_IMAGES)")
        return images

    def _images(self, images: int, payloads: list[EmbeddingPayload] | None, image_ids: tuple[str, ...]):
        """(grids, keys, embeddings, deepstack) of the request's images, from payloads or remembered grids."""
        if image_ids and len(image_ids) != images:
            raise InvalidRequest(f"the messages hold {images} images but {len(image_ids)} image ids were given")
        if payloads is None:
            grids = [self.image_grids.get(i) for i in image_ids]
            if len(grids) != images or None in grids:
                raise NeedPayload("the images' grids are unknown to this decoder")
            return grids, list(image_ids), None, ()
        if len(payloads) != images:
            raise InvalidRequest(f"the messages hold {images} images but {len(payloads)} payloads were given")
        keys = []
        for i, payload in enumerate(payloads):
            self.check_payload(payload)
            claimed = image_ids[i] if image_ids else ""
            if claimed and payload.image_id and payload.image_id != claimed:
                raise InvalidRequest(f"payload {i} is for image {payload.image_id}, but it was sent for image {claimed}")
            key = payload.image_id or claimed
            keys.append(key or f"unnamed:{uuid.uuid4()}")  # an unnamed image is never reused
            if key:
                self._remember(key, payload.grid_thw)
        if not payloads:
            return [], [], None, ()
        embeddings = torch.cat([p.embeddings for p in payloads]).to(self.device, self.dtype)
        deepstack = tuple(torch.cat([p.deepstack[level] for p in payloads]).to(self.device, self.dtype)
                          for level in range(self.deepstack_levels))
        return [p.grid_thw for p in payloads], keys, embeddings, deepstack

    def check_payload(self, payload: EmbeddingPayload) -> None:
        if payload.fingerprint != self.fingerprint:
            raise ModelMismatch(
                f"embeddings were made by model {payload.fingerprint}, this decoder serves {self.fingerprint}"
            )
        # grid divisible by the merge size, n_tokens matching it, hidden size, deepstack shapes
        validate_payload(payload, self.merge_size, self.hidden_size)
        if len(payload.deepstack) != self.deepstack_levels:
            raise CorruptPayload(f"payload has {len(payload.deepstack)} deepstack levels, model needs {self.deepstack_levels}")

    def _remember(self, image_id: str, grid: tuple[int, int, int]) -> None:
        self.image_grids[image_id] = tuple(grid)
        self.image_grids.move_to_end(image_id)
        while len(self.image_grids) > MAX_REMEMBERED_IMAGES:
            self.image_grids.popitem(last=False)

    def _prompt(self, messages: list[Message], grids, keys, embeddings, deepstack) -> Prompt:
        inputs = self.prompts(messages, grids)
        ids, mm = inputs.input_ids.tolist(), inputs.mm_token_type_ids
        positions, _ = mrope_positions(mm, grids, self.merge_size)
        spans, row = [], 0
        starts = [i for i in range(len(ids)) if mm[i] and (i == 0 or not mm[i - 1])]
        for start, grid, key in zip(starts, grids, keys):
            length = self.prompts.tokens_per_image(grid)
            spans.append(ImageSpan(start, length, key, row))
            row += length
        end = spans[-1].start + spans[-1].length if spans else 0
        cache_point = end + 1 if spans and end < len(ids) and ids[end] == self.vision_end_id else end
        return Prompt(ids, positions, int(positions[:, -1].max()) + 1, tuple(spans), embeddings, tuple(deepstack),
                      cache_point)

    def _sequence(self, prompt: Prompt, index: int, max_new_tokens: int, worst: int) -> Sequence:
        return Sequence(prompt, self.root, self.config.block_size, max_new_tokens, index=index, worst=worst)

    def _generate_request(self, prompts: list[Prompt], params: list[SamplingParams]) -> GenerateRequest:
        seqs = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            self._check_length(len(prompt), p.max_new_tokens, "max_new_tokens")
            worst = -(-(len(prompt) + p.max_new_tokens) // self.config.block_size)
            seqs.append(self._sequence(prompt, i, p.max_new_tokens, worst))
        tokenizer = self.prompts.tokenizer.backend_tokenizer
        return GenerateRequest(seqs, [Sampler(p, self.device) for p in params],
                               [Detokenizer(tokenizer, p.stop) for p in params], self.eos_ids, self.max_len)

    def _classify_request(self, prompts: list[Prompt], labels: list[list[str]],
                          label_ids: list[list[list[int]]]) -> ClassifyRequest:
        bs, seqs = self.config.block_size, []
        for i, (prompt, ids) in enumerate(zip(prompts, label_ids)):
            self._check_length(len(prompt), max(len(x) for x in ids), "the longest label")
            rows = sum(-(-(len(prompt) + len(x) - 1) // bs) - len(prompt) // bs for x in ids if len(x) > 1)
            seqs.append(self._sequence(prompt, i, 0, -(-len(prompt) // bs) + rows))
        return ClassifyRequest(seqs, [(list(check), ids) for check, ids in zip(labels, label_ids)])

    def _tokenize_labels(self, labels: list[str]) -> list[list[int]]:
        if not labels:
            raise InvalidRequest("at least one label is required")
        if len(labels) > self.config.max_labels:
            raise TooLarge(f"{len(labels)} labels; the limit is {self.config.max_labels} (VLSPLIT_MAX_LABELS)")
        if len(set(labels)) != len(labels):
            raise InvalidRequest("labels must be distinct")
        out = []
        for label in labels:
            if not isinstance(label, str) or not label.strip():
                raise InvalidRequest("labels must be non-empty")
            ids = self.prompts.tokenizer(label, add_special_tokens=False)["input_ids"]
            if len(ids) > self.config.max_label_tokens:
                raise TooLarge(f"label {label[:40]!r} is {len(ids)} tokens; the limit is "
                               f"{self.config.max_label_tokens} (VLSPLIT_MAX_LABEL_TOKENS)")
            out.append(ids)
        return out

    def _validate_sampling(self, params: SamplingParams) -> SamplingParams:
        params = params.validate(self.config.max_new_tokens_limit)
        if len(params.stop) > self.config.max_stop:
            raise TooLarge(f"{len(params.stop)} stop strings; the limit is {self.config.max_stop} (VLSPLIT_MAX_STOP)")
        for stop in params.stop:
            if len(stop) > self.config.max_stop_chars:
                raise TooLarge(f"a stop string is {len(stop)} characters; the limit is "
                               f"{self.config.max_stop_chars} (VLSPLIT_MAX_STOP_CHARS)")
        return params

    def _check_length(self, prompt_tokens: int, new_tokens: int, what: str) -> None:
        if prompt_tokens + new_tokens > self.max_len:
            raise TooLarge(f"the prompt is {prompt_tokens} tokens and {what} adds up to {new_tokens}: over the "
                           f"context limit of {self.max_len} tokens (max_model_len)")

    def _check_blocks(self, request: Request) -> None:
        """A request that could never fit in the pool is refused now (it would wait forever)."""
        bs = self.config.block_size
        shared = _common_prefix([s.prompt.ids for s in request.seqs]) // bs
        need = shared + sum(s.worst - shared for s in request.seqs)
        limit = self.request_block_limit
        if need > limit:
            raise TooLarge(f"the request needs up to {need} KV blocks ({need * bs} tokens); the limit is {limit} "
                           f"blocks ({'the whole KV pool, VLSPLIT_KV_CACHE_BYTES' if limit == self.blocks.num_blocks else 'VLSPLIT_MAX_REQUEST_BLOCKS'})")

    def _check_cached(self, request: Request) -> None:
        """Without payloads, every image token must lie in cached blocks (a warm start)."""
        for seq in request.seqs:
            prompt = seq.prompt
            match = self.blocks.match(seq, len(prompt), limit=len(prompt) - 1)
            if match.tokens < prompt.image_end:
                raise NeedPayload(f"the KV of the images is not cached ({match.tokens} of {prompt.image_end} tokens)")

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


def _common_prefix(lists: list[list[int]]) -> int:
    first, n = lists[0], len(lists[0])
    for other in lists[1:]:
        n = min(n, len(other))
        for i in range(n):
            if other[i] != first[i]:
                n = i
                break
    return n


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
