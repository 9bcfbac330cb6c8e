"""LLMDecoder servicer: proto <-> domain types, and the order of a Generate/Classify call.

Generate: read the header and validate it (before any payload byte is accepted) -> take a place in
the bounded admission queue -> payloads: read the announced bytes; or, when the header names
image_ids and announces none, start from the prefix cache, and if it does not hold them reply
`need_payload` and read sizes + bytes from the same stream -> decode payloads and generate in a
worker thread -> stream one response per token (with a batch, tagged with its conversation's
index). Errors are typed `VlsplitError`s; the interceptor turns them into status codes. When the
RPC ends for any reason (client cancel or disconnect, deadline, shutdown past the grace period) the
generation is cancelled within one token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from vlsplit.shared import metrics
from vlsplit.shared.codec import FORMAT_VERSION, decode_payload
from vlsplit.shared.config import DecoderConfig
from vlsplit.shared.errors import InvalidRequest, TooLarge, Unavailable
from vlsplit.shared.processor import Message, validate_messages
from vlsplit.shared.sampling import SamplingParams, sampling_from_pb
from vlsplit.shared.transfer import Assembler
from vlsplit.v1 import common_pb2, llm_decoder_pb2, llm_decoder_pb2_grpc

from .admission import Admission
from .batch import generate_batch
from .classify import classify
from .engine import DecoderEngine, GenerationRequest, TokenEvent, WarmStart
from .metrics import PAYLOAD_BYTES
from .scheduler import Scheduler
from .streaming import ThreadedGeneration

log = logging.getLogger("vlsplit.decoder.rpc")
FINISH_REASONS = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}


@dataclass(frozen=True)
class Job:
    """A validated Generate/Classify header."""

    conversations: list[list[Message]]  # one, or a batch sharing the same images
    sampling: SamplingParams
    payload_sizes: list[int]  # empty with image_ids: negotiate (prefix cache, else ask for payloads)
    request_id: str
    image_ids: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()

    @property
    def negotiates(self) -> bool:
        """Image ids without payload sizes: start from the prefix cache, or ask for the payloads."""
        return bool(self.image_ids) and not self.payload_sizes

    @property
    def images(self) -> int:
        return _image_count(self.conversations[0])

    def requests(self, payloads: list[bytes], warm: WarmStart | None) -> list[GenerationRequest]:
        decoded = [decode_payload(p) for p in payloads]
        return [GenerationRequest(c, decoded, self.sampling, self.image_ids, warm) for c in self.conversations]

    def events(self, scheduler: Scheduler, payloads: list[bytes], warm: WarmStart | None, cancelled):
        """One conversation joins the continuous batch; a batch of conversations about one image is
        decoded as its own batch over their shared prefix."""
        requests = self.requests(payloads, warm)
        if len(requests) == 1:
            return (Indexed(0, e) for e in scheduler.stream(requests[0], cancelled))
        return (Indexed(i, e) for i, e in generate_batch(scheduler.engine, requests, cancelled))


@dataclass(frozen=True)
class Indexed:
    """A TokenEvent of conversation `index` (ThreadedGeneration reads `finish_reason`)."""

    index: int
    event: TokenEvent

    @property
    def finish_reason(self) -> str | None:
        return self.event.finish_reason


class LLMDecoderServicer(llm_decoder_pb2_grpc.LLMDecoderServicer):
    def __init__(self, config: DecoderConfig):
        self.config = config
        self.engine: DecoderEngine | None = None  # set by `serve` once loaded and warmed up
        self.scheduler: Scheduler | None = None
        self.admission = Admission(config.max_concurrent, config.max_queue)
        self.pool = ThreadPoolExecutor(config.max_concurrent, thread_name_prefix="generate")

    def serve(self, engine: DecoderEngine) -> None:
        self.scheduler = Scheduler(engine, self.config.max_batch)
        self.engine = engine

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    async def GetModelInfo(self, request, context) -> common_pb2.ModelInfo:
        engine = self._ready()
        return common_pb2.ModelInfo(model_type=engine.family.model_type, fingerprint=engine.fingerprint,
                                    dtype=self.config.dtype, payload_format=FORMAT_VERSION)

    async def Generate(self, requests, context):
        engine = self._ready()
        messages = aiter(requests)
        job = job_from_header(await _read_header(messages), engine.max_new_tokens_limit, self.config)
        warm = self._warm_start(engine, job)
        if job.negotiates and warm is None:
            yield llm_decoder_pb2.GenerateResponse(need_payload=True)
        assembler = await self._assembler(job, warm, messages)  # before a slot: never held while payloads are made
        async with self.admission.slot() as slot:
            payloads = await _read_payloads(messages, assembler)
            generation = ThreadedGeneration(lambda cancelled: job.events(self.scheduler, payloads, warm, cancelled),
                                            self.pool)
            generation.future.add_done_callback(lambda _: slot.release())
            context.add_done_callback(lambda _: generation.cancel())
            async for response in _responses(job, generation, messages, warm is not None):
                yield response

    async def Classify(self, requests, context):
        engine = self._ready()
        messages = aiter(requests)
        job = job_from_header(await _read_header(messages), engine.max_new_tokens_limit, self.config)
        if not job.labels:
            raise InvalidRequest("Classify needs labels")
        warm = self._warm_start(engine, job)
        if job.negotiates and warm is None:
            yield llm_decoder_pb2.ScoreResponse(need_payload=True)
        assembler = await self._assembler(job, warm, messages)
        async with self.admission.slot():
            payloads = await _read_payloads(messages, assembler)
            [request] = job.requests(payloads, warm)
            scores = await asyncio.get_running_loop().run_in_executor(
                self.pool, classify, engine, request, list(job.labels))
        yield llm_decoder_pb2.ScoreResponse(
            prefix_cached=warm is not None,
            scores=[common_pb2.LabelScore(label=s.label, logprob=s.logprob, prob=s.prob) for s in scores])

    @staticmethod
    def _warm_start(engine: DecoderEngine, job: Job) -> WarmStart | None:
        # On the event loop: tokenizing a prompt and forking a cached state take about a millisecond.
        return engine.warm_start(job.conversations[0], job.image_ids) if job.negotiates else None

    async def _assembler(self, job: Job, warm: WarmStart | None, messages) -> Assembler:
        """Where the request's payload bytes will go; its sizes are checked against the limit now."""
        sizes = [] if warm is not None else (
            await _read_sizes(messages, job.images) if job.negotiates else job.payload_sizes)
        return Assembler(sizes, self.config.max_payload_bytes)

    def _ready(self) -> DecoderEngine:
        if self.engine is None:
            raise Unavailable("decoder is loading its model; retry shortly")
        return self.engine


async def _responses(job: Job, generation: ThreadedGeneration, messages, prefix_cached: bool):
    """Stream the generation's events as responses, with TTFT and speed metrics."""
    start = time.perf_counter()  # the last payload byte has just arrived
    first = None
    extra = asyncio.create_task(_reject_extra_messages(messages, generation))
    try:
        async for item in generation:
            event = item.event
            now = time.perf_counter()
            response = response_from_event(event)
            response.index, response.prefix_cached = item.index, prefix_cached
            if first is None:
                first = now
                response.ttft_ms = (now - start) * 1000
                metrics.TTFT_SECONDS.observe(now - start)
            if event.token_id is not None:
                metrics.TOKENS.inc()
            if event.usage is not None:
                _finished(job, event, start, first, now)
            yield response
    finally:
        generation.cancel()
        extra.cancel()


def _finished(job: Job, event: TokenEvent, start: float, first: float, end: float) -> None:
    tokens = event.usage.completion_tokens
    if tokens > 1 and end > first:
        metrics.TOKENS_PER_S.observe((tokens - 1) / (end - first))  # decode steps after the first token
    ttft_ms, total_ms = round((first - start) * 1000, 2), round((end - start) * 1000, 2)
    log.info("generated %d tokens (%s) for request %r: ttft %.1f ms, total %.1f ms",
             tokens, event.finish_reason, job.request_id, ttft_ms, total_ms,
             extra={"request_id": job.request_id, "prompt_tokens": event.usage.prompt_tokens,
                    "image_tokens": event.usage.image_tokens, "completion_tokens": tokens,
                    "finish_reason": event.finish_reason, "ttft_ms": ttft_ms, "total_ms": total_ms})


# ---- request stream ------------------------------------------------------------------------------


async def _read_header(messages) -> llm_decoder_pb2.GenerateHeader:
    message = await anext(messages, None)
    if message is None or message.WhichOneof("part") != "header":
        raise InvalidRequest("the first Generate message must be the header")
    return message.header


async def _read_sizes(messages, images: int) -> list[int]:
    message = await anext(messages, None)
    if message is None or message.WhichOneof("part") != "payload_sizes":
        raise InvalidRequest("after need_payload, the next message must be payload_sizes")
    sizes = list(message.payload_sizes.payload_bytes)
    if len(sizes) != images:
        raise InvalidRequest(f"the messages hold {images} images but payload_sizes lists {len(sizes)} payloads")
    return sizes


async def _read_payloads(messages, assembler: Assembler) -> list[bytes]:
    while not assembler.complete and (message := await anext(messages, None)) is not None:
        if message.WhichOneof("part") != "payload_chunk":
            raise InvalidRequest("after the header, only payload_chunk messages may follow")
        assembler.add(message.payload_chunk)
    payloads = assembler.payloads()  # InvalidRequest if the stream ended short
    PAYLOAD_BYTES.inc(sum(map(len, payloads)))
    return payloads


async def _reject_extra_messages(messages, generation: ThreadedGeneration) -> None:
    """Generation starts once the announced bytes are in; anything sent after that is an error."""
    if await anext(messages, None) is not None:
        generation.fail(InvalidRequest("more payload bytes (or messages) than the header announced"))


# ---- proto <-> domain ----------------------------------------------------------------------------


def job_from_header(header: llm_decoder_pb2.GenerateHeader, max_new_tokens_limit: int,
                    config: DecoderConfig) -> Job:
    conversations = ([messages_from_pb(c.messages) for c in header.batch] if header.batch
                     else [messages_from_pb(header.messages)])
    counts = {_image_count(c) for c in conversations}
    if len(counts) != 1:
        raise InvalidRequest("every conversation of a batch must hold the same images")
    images = counts.pop()
    if images > config.max_images:
        raise TooLarge(f"the messages hold {images} images; the limit is {config.max_images}")
    sizes, image_ids = list(header.payload_bytes), tuple(header.image_ids)
    if image_ids and len(image_ids) != images:
        raise InvalidRequest(f"the messages hold {images} images but image_ids lists {len(image_ids)}")
    if (sizes or not image_ids) and images != len(sizes):
        raise InvalidRequest(f"the messages hold {images} images but payload_bytes lists {len(sizes)} payloads")
    sampling = sampling_from_pb(header.sampling, config.default_max_new_tokens).validate(max_new_tokens_limit)
    return Job(conversations, sampling, sizes, header.request_id, image_ids, tuple(header.labels))


def _image_count(conversation: list[Message]) -> int:
    return sum(part.get("type") == "image" for message in conversation for part in message["content"])


def messages_from_pb(messages) -> list[Message]:
    out: list[Message] = []
    for i, message in enumerate(messages):
        parts = []
        for part in message.content:
            kind = part.WhichOneof("part")
            if kind is None:
                raise InvalidRequest(f"message {i}: a content part has neither text nor image")
            parts.append({"type": "text", "text": part.text} if kind == "text" else {"type": "image"})
        out.append({"role": message.role, "content": parts})
    validate_messages(out)
    return out


def response_from_event(event: TokenEvent) -> llm_decoder_pb2.GenerateResponse:
    response = llm_decoder_pb2.GenerateResponse(text=event.text)
    if event.token_id is not None:
        response.token_ids.append(event.token_id)
    if event.finish_reason is not None:
        response.finish_reason = FINISH_REASONS[event.finish_reason]
    if event.usage is not None:
        response.usage.CopyFrom(common_pb2.Usage(prompt_tokens=event.usage.prompt_tokens,
                                                 image_tokens=event.usage.image_tokens,
                                                 completion_tokens=event.usage.completion_tokens))
    return response
