"""LLMDecoder servicer: proto <-> domain types, and the order of a Generate/Classify call.

    header (validated before any payload byte is accepted)
    -> image ids and no sizes: is the images' KV cached? yes: no payload at all; no: `need_payload`
    -> sizes: reserve their bytes from the receiving budget (RESOURCE_EXHAUSTED when full), read the
       chunks (a stream silent for VLSPLIT_STREAM_IDLE_S is dropped, DEADLINE_EXCEEDED)
    -> engine.prepare (bounds, payload checks) -> engine.submit (the scheduler's bounded queue)
    -> outputs streamed back; the request is cancelled in the engine when the RPC ends for any reason.
Nothing is held by a call that has not reached the engine but its announced bytes (bounded), and
nothing in the engine is held by a call that has gone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from shared import metrics
from shared.codec import FORMAT_VERSION, decode_payload
from shared.config import DecoderConfig
from shared.errors import InvalidRequest, Unavailable
from shared.fingerprint import processor_config, processor_settings
from shared.hardware import Runtime
from shared.processor import validate_messages
from shared.schema import Message, media_count
from shared.sampling import SamplingParams, sampling_from_pb
from shared.transfer import Assembler
from vlsplit.v1 import common_pb2, llm_decoder_pb2, llm_decoder_pb2_grpc

from .engine import DecoderEngine, TokenEvent
from .intake import media_in
from .metrics import CANCELLED, PAYLOAD_BYTES
from .payload_stream import PayloadBudget, RequestStream
from .request import END, NeedPayload, SequenceGroup

log = logging.getLogger("vlsplit.decoder.rpc")
FINISH_REASONS = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}
NEED_PAYLOAD = object()  # yielded by `_run`: ask the client for the payloads


@dataclass(frozen=True)
class Job:
    """A validated Generate/Classify header."""

    conversations: list[list[Message]]  # one, or several about the same images
    sampling: SamplingParams | list[SamplingParams]  # one for all, or one per conversation
    payload_sizes: list[int]  # empty with image_ids: negotiate (cached KV, else ask for payloads)
    request_id: str
    image_ids: tuple[str, ...] = ()
    labels: list[list[str]] | None = None  # Classify: per conversation
    resume: tuple = ()  # Generate: answer tokens another replica already delivered (per conversation of a batch)
    cache_salt: str = ""  # the prefix cache's partition (the gateway's tenant); "" = shared

    @property
    def negotiates(self) -> bool:
        """Image ids without payload sizes: start from cached KV, or ask for the payloads."""
        return bool(self.image_ids) and not self.payload_sizes

    @property
    def images(self) -> int:
        return media_count(self.conversations[0])


class LLMDecoderServicer(llm_decoder_pb2_grpc.LLMDecoderServicer):
    def __init__(self, config: DecoderConfig):
        self.config = config
        self.engine: DecoderEngine | None = None  # set by `serve` once loaded and warmed up
        self.budget: PayloadBudget | None = None

    def serve(self, engine: DecoderEngine, runtime: Runtime) -> None:
        self.runtime = runtime
        limit = self.config.max_payload_bytes or engine.largest_request_payload
        self.max_payload_bytes = limit
        settings = processor_settings(processor_config(Path(engine.checkpoint.path)))
        self.image_tokens = common_pb2.ImageTokenRule(  # gateways estimate payloads with it (before encoding)
            patch_size=settings["patch_size"], merge_size=settings["merge_size"], min_pixels=settings["min_pixels"],
            max_pixels=settings["max_pixels"])
        self.budget = PayloadBudget(self.config.max_receiving_bytes or 4 * limit)
        self.engine = engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    async def GetModelInfo(self, request, context) -> common_pb2.ModelInfo:
        engine = self._ready()
        return common_pb2.ModelInfo(model_type=engine.family.model_type, fingerprint=engine.fingerprint,
                                    payload_format=FORMAT_VERSION, max_payload_bytes=self.max_payload_bytes,
                                    payload_values_per_token=engine.hidden_size * (1 + engine.deepstack_levels),
                                    image_tokens=self.image_tokens, max_model_len=engine.max_len,
                                    **self.runtime.info_fields())

    async def Generate(self, requests, context):
        stream = RequestStream(aiter(requests), self.config.stream_idle_s, self.config.payload_wait_s)
        first = None
        async for item, cached in self._run(stream, context, classify=False):
            if item is NEED_PAYLOAD:
                yield llm_decoder_pb2.GenerateResponse(need_payload=True)
                continue
            job, (index, event) = item
            response = response_from_event(event, self._token_text)
            response.index, response.prefix_cached = index, cached
            now = time.perf_counter()
            if first is None:  # TTFT from the request's last message (the last payload byte)
                first = now
                response.ttft_ms = (now - stream.last_message_at) * 1000
                metrics.TTFT_SECONDS.observe(now - stream.last_message_at)
            if event.token_id is not None:
                metrics.TOKENS.inc()
            if event.usage is not None:
                _finished(job.request_id, event, stream.last_message_at, first, now)
            yield response

    async def Classify(self, requests, context):
        stream = RequestStream(aiter(requests), self.config.stream_idle_s, self.config.payload_wait_s)
        async for item, cached in self._run(stream, context, classify=True):
            if item is NEED_PAYLOAD:
                yield llm_decoder_pb2.ScoreResponse(need_payload=True)
                continue
            _, (index, scores) = item
            yield llm_decoder_pb2.ScoreResponse(
                index=index, prefix_cached=cached,
                scores=[common_pb2.LabelScore(label=s.label, logprob=s.logprob, prob=s.prob) for s in scores])

    async def _run(self, stream: "RequestStream", context, classify: bool) -> AsyncIterator[tuple[object, bool]]:
        """The call's order, shared by Generate and Classify: yields (NEED_PAYLOAD, False) when the
        payloads are needed, then ((job, engine output), cached) for each output."""
        engine = self._ready()
        job = job_from_header(await stream.header(), self.config, classify)
        await asyncio.to_thread(engine.check_sampling, job.sampling)  # a bad grammar fails before any payload
        request = await asyncio.to_thread(_warm, engine, job) if job.negotiates else None
        reserved = 0
        try:
            while True:
                cached, sent = request is not None, False
                if request is None:
                    if job.negotiates:
                        yield NEED_PAYLOAD, False
                    sizes = await stream.sizes(job.images) if job.negotiates else job.payload_sizes
                    Assembler.check(sizes, self.max_payload_bytes)
                    reserved = self.budget.reserve(sum(sizes))  # before a byte of it is allocated
                    payloads = await stream.payloads(Assembler(sizes, self.max_payload_bytes))
                    PAYLOAD_BYTES.inc(sum(sizes))
                    request = await asyncio.to_thread(_prepare, engine, job, payloads)
                    del payloads  # the request holds the tensors now; the reservation bounds them
                try:
                    async for output in _outputs(engine, request, stream, context):
                        sent = True
                        yield (job, output), cached
                    return
                except NeedPayload:
                    if not cached or sent:
                        raise
                    request = None  # its cached KV was evicted before admission: ask for the payloads
        finally:
            self.budget.release(reserved)

    @functools.lru_cache(maxsize=65536)
    def _token_text(self, token_id: int) -> tuple[str, bytes]:
        """A token's text and exact bytes (byte-level BPE: a token may hold part of a character)."""
        tokenizer = self.engine.prompts.tokenizer
        piece = tokenizer.convert_ids_to_tokens(token_id)
        raw = bytes(_BYTE_DECODER.get(c, 0) for c in piece) if all(c in _BYTE_DECODER for c in piece) else None
        text = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return text, raw if raw is not None else text.encode()

    def _ready(self) -> DecoderEngine:
        if self.engine is None:
            raise Unavailable("decoder is loading its model; retry shortly")
        return self.engine


def _warm(engine: DecoderEngine, job: Job) -> SequenceGroup | None:
    """The request without payloads, if the images' KV is cached. Worker thread."""
    try:
        return engine.prepare(job.conversations, None, job.sampling, job.image_ids, job.labels, job.resume,
                              job.cache_salt)
    except NeedPayload:
        return None


def _prepare(engine: DecoderEngine, job: Job, payloads: list[bytes]) -> SequenceGroup:
    """Decode the payloads and build the request. Worker thread (tensors from bytes, tokenizing)."""
    decoded = [decode_payload(p) for p in payloads]
    if job.image_ids:
        for i, payload in enumerate(decoded):
            if not payload.image_id:
                raise InvalidRequest(f"payload {i} does not name its image (payload format v{FORMAT_VERSION})")
    return engine.prepare(job.conversations, decoded, job.sampling, job.image_ids, job.labels, job.resume,
                          job.cache_salt)


async def _outputs(engine: DecoderEngine, request: SequenceGroup, stream: RequestStream, context) -> AsyncIterator:
    """Submit `request` and yield its outputs. Ends (cancelling it in the engine) with the RPC."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def sink(item: object) -> None:  # engine thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the process is exiting, nobody is listening
            pass

    engine.submit(request, sink)
    context.add_done_callback(lambda _: engine.cancel(request))
    extra, outcome = None, None
    try:
        while (item := await queue.get()) is not END:
            if isinstance(item, BaseException):
                outcome = "failed"
                raise item
            if extra is None:  # the client must send nothing more once its request runs
                extra = asyncio.create_task(stream.expect_end(queue.put_nowait))
            yield item
        outcome = "done"
    finally:
        if extra is not None:
            extra.cancel()
        if outcome is None:  # the client went away (cancel, deadline, disconnect, shutdown)
            CANCELLED.inc()
        engine.cancel(request)


def _finished(request_id: str, event: TokenEvent, start: float, first: float, end: float) -> None:
    tokens = event.usage.completion_tokens
    if tokens > 1 and end > first:
        metrics.TOKENS_PER_S.observe((tokens - 1) / (end - first))  # decode steps after the first token
    ttft_ms, total_ms = round((first - start) * 1000, 2), round((end - start) * 1000, 2)
    log.info("generated %d tokens (%s) for request %r: ttft %.1f ms, total %.1f ms",
             tokens, event.finish_reason, request_id, ttft_ms, total_ms,
             extra={"request_id": request_id, "prompt_tokens": event.usage.prompt_tokens,
                    "image_tokens": event.usage.image_tokens, "completion_tokens": tokens,
                    "finish_reason": event.finish_reason, "ttft_ms": ttft_ms, "total_ms": total_ms})


# ---- proto <-> domain ----------------------------------------------------------------------------


def job_from_header(header: llm_decoder_pb2.GenerateHeader, config: DecoderConfig, classify: bool) -> Job:
    conversations = ([messages_from_pb(c.messages) for c in header.batch] if header.batch
                     else [messages_from_pb(header.messages)])
    images = media_in(conversations, config.max_images)
    sizes, image_ids = list(header.payload_bytes), tuple(header.image_ids)
    if image_ids and len(image_ids) != images:
        raise InvalidRequest(f"the messages hold {images} images but image_ids lists {len(image_ids)}")
    if (sizes or not image_ids) and images != len(sizes):
        raise InvalidRequest(f"the messages hold {images} images but payload_bytes lists {len(sizes)} payloads")
    sampling = sampling_from_pb(header.sampling, config.default_max_new_tokens)
    labels = None
    if classify:
        labels = [list(c.labels) for c in header.batch] if header.batch else [list(header.labels)]
        if not all(labels):
            raise InvalidRequest("Classify needs labels for every check")
    resume: tuple = tuple(header.resume_token_ids)
    if resume and (classify or header.batch or header.n > 1):
        raise InvalidRequest("resume_token_ids continue one Generate answer; not a batch, n > 1 or Classify")
    if header.batch and any(c.resume_token_ids or c.HasField("seed") for c in header.batch):
        if classify:
            raise InvalidRequest("a Classify check has no answer to resume or seed")
        resume = tuple(tuple(c.resume_token_ids) for c in header.batch)  # per conversation (migration)
        sampling = [dataclasses.replace(sampling, seed=c.seed) if c.HasField("seed") else sampling
                    for c in header.batch]
    if header.n > 1:
        conversations, sampling = _choices(header, conversations[0], sampling, config, classify)
    return Job(conversations, sampling, sizes, header.request_id, image_ids, labels, resume, header.cache_salt)


def _choices(header, conversation: list[Message], sampling: SamplingParams, config: DecoderConfig, classify: bool,
             ) -> tuple[list[list[Message]], list[SamplingParams]]:
    """n answers to one conversation: n rows sharing its prefix, answer j seeded seed + j."""
    if classify or header.batch:
        raise InvalidRequest("n answers one Generate conversation; not a batch or Classify")
    if header.n > config.max_rows:
        raise InvalidRequest(f"n is {header.n}; the limit is {config.max_rows} (VLSPLIT_MAX_ROWS)")
    seeds = [None if sampling.seed is None else (sampling.seed + j) % 2**64 for j in range(header.n)]
    return [conversation] * header.n, [dataclasses.replace(sampling, seed=seed) for seed in seeds]


def messages_from_pb(messages) -> list[Message]:
    out: list[Message] = []
    for i, message in enumerate(messages):
        parts = []
        for part in message.content:
            kind = part.WhichOneof("part")
            if kind is None:
                raise InvalidRequest(f"message {i}: a content part has neither text, image nor video")
            parts.append({"type": "text", "text": part.text} if kind == "text" else {"type": kind})
        out.append({"role": message.role, "content": parts})
    validate_messages(out)
    return out


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE's characters -> the bytes they stand for (Qwen's tokenizer uses it)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


_BYTE_DECODER = _byte_decoder()


def response_from_event(event: TokenEvent, token_text=None) -> llm_decoder_pb2.GenerateResponse:
    response = llm_decoder_pb2.GenerateResponse(text=event.text)
    if event.token_id is not None:
        response.token_ids.append(event.token_id)
        if event.logprobs is not None:
            response.logprobs.append(_logprob_pb(event.token_id, event.logprobs.logprob, event.logprobs.top, token_text))
    if event.finish_reason is not None:
        response.finish_reason = FINISH_REASONS[event.finish_reason]
    if event.usage is not None:
        response.usage.CopyFrom(common_pb2.Usage(prompt_tokens=event.usage.prompt_tokens,
                                                 image_tokens=event.usage.image_tokens,
                                                 completion_tokens=event.usage.completion_tokens))
    return response


def _logprob_pb(token_id: int, logprob: float, top, token_text) -> common_pb2.TokenLogprob:
    text, raw = token_text(token_id)
    out = common_pb2.TokenLogprob(token_id=token_id, token=text, bytes=raw, logprob=logprob)
    for alt, alt_logprob in top:
        alt_text, alt_raw = token_text(alt)
        out.top.append(common_pb2.TopLogprob(token_id=alt, token=alt_text, bytes=alt_raw, logprob=alt_logprob))
    return out
