"""What the gateway does for one question: embeddings from the cache or an encoder, then tokens
from a decoder replica chosen by image (see routing.py). Plain async code over the clients and the
cache; no proto parsing here."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

from shared import metrics
from shared.cache import SafeStore, embedding_key
from shared.errors import InvalidRequest, TooLarge, Unavailable, Upstream
from shared.image_ids import VideoParams, check_image_id, image_id as sha256_id, scoped_image_id, video_media_id
from vlsplit.v1 import common_pb2, gateway_pb2, llm_decoder_pb2, vision_encoder_pb2

from .admission import PayloadAdmission
from .pools import DecoderPool, EncoderPool
from .routing import DECODER_REQUESTS, FAILOVERS, MIGRATIONS, Router, failover_reason

log = logging.getLogger("vlsplit.gateway")


@dataclass(frozen=True)
class ImageSource:
    """An image, or with `video` a clip and how it is sampled."""

    data: bytes | None = None
    image_id: str | None = None  # the content id clients see
    scope: str = ""  # the owner, when images are scoped (auth on, VLSPLIT_CACHE_SCOPE=tenant)
    video: VideoParams | None = None

    @property
    def what(self) -> str:
        return "image" if self.video is None else "video"

    def validated(self, max_bytes: int, max_video_bytes: int = 0) -> "ImageSource":
        if self.data is not None:
            limit = max_bytes if self.video is None else (max_video_bytes or max_bytes)
            if not self.data:
                raise InvalidRequest(f"{self.what} bytes are empty")
            if len(self.data) > limit:
                setting = "VLSPLIT_MAX_IMAGE_BYTES" if self.video is None else "VLSPLIT_MAX_VIDEO_BYTES"
                raise TooLarge(f"{self.what} is {len(self.data)} bytes; the limit is {limit} bytes ({setting})")
            return dataclasses.replace(self, image_id=sha256_id(self.data))
        if self.image_id is None:
            raise InvalidRequest(f"an {self.what} is required: set its data or its image_id")
        check_image_id(self.image_id)
        return self

    @property
    def key(self) -> str:
        """The image's (clip's, for its sampling) id inside vlsplit: cache key, decoder prefix, payload, routing."""
        content = self.image_id if self.video is None else video_media_id(self.image_id, self.video)
        return scoped_image_id(self.scope, content)

    def encode_request(self, max_tokens: int = 0) -> vision_encoder_pb2.EncodeRequest:
        request = (vision_encoder_pb2.EncodeRequest(image=self.data, scope=self.scope) if self.data is not None
                   else vision_encoder_pb2.EncodeRequest(image_id=self.image_id, scope=self.scope))
        if self.video is not None:
            self.video.to_pb(request.video)
            request.max_tokens = max_tokens
        return request

    def placeholder(self) -> llm_decoder_pb2.ContentPart:
        """Where it goes in the decoder's messages."""
        if self.video is not None:
            return llm_decoder_pb2.ContentPart(video=llm_decoder_pb2.VideoPlaceholder())
        return llm_decoder_pb2.ContentPart(image=llm_decoder_pb2.ImagePlaceholder())


@dataclass(frozen=True)
class Embeddings:
    payload: bytes
    image_id: str
    cache_hit: bool
    encode_ms: float


class Pipeline:
    def __init__(self, encoder: EncoderPool, decoders: DecoderPool, router: Router, cache: SafeStore,
                 cache_ttl_s: int, write_back: bool, migration_limit: int = 1,
                 admission: PayloadAdmission | None = None):
        self.encoder, self.decoders, self.router, self.cache = encoder, decoders, router, cache
        self.admission = admission or PayloadAdmission()
        self.migration_limit = migration_limit
        self.cache_ttl_s = cache_ttl_s
        self.write_back = write_back  # "memory" backend: the gateway keeps what it fetched
        self._fingerprint: str | None = None
        self._watches: list[asyncio.Task] = []

    async def start(self, resolve_every_s: float) -> None:
        """Resolve the decoder and encoder names now, then again every `resolve_every_s` in the background."""
        self._watches = []
        await self.encoder.retain(self.encoder.router.replicas)  # health watches from the start
        for router, pool in ((self.router, self.decoders), (self.encoder.router, self.encoder)):
            if router.dynamic:
                await router.refresh()
                await pool.retain(router.replicas)
                self._watches.append(asyncio.create_task(router.watch(resolve_every_s, pool.retain)))

    async def fingerprint(self, timeout: float) -> str:
        """The served model's fingerprint, from the encoder or (if it is down) the decoder."""
        if self._fingerprint is None:
            try:
                info = await self.encoder.model_info(timeout)
            except Unavailable:
                info = await self._decoder_model_info(timeout)
            self._fingerprint = info.fingerprint
        return self._fingerprint

    async def _decoder_model_info(self, timeout: float) -> common_pb2.ModelInfo:
        for i, replica in enumerate(self.router.replicas):
            try:
                return await self.decoders.get(replica).model_info(timeout)
            except Unavailable:
                if i == len(self.router.replicas) - 1:
                    raise

    async def embeddings(self, source: ImageSource, timeout: float, max_tokens: int = 0) -> Embeddings:
        start = time.perf_counter()
        key = embedding_key(await self.fingerprint(timeout), source.key)
        cached = await self.cache.get(key)
        metrics.CACHE.labels("hit" if cached else "miss").inc()
        if cached:
            return Embeddings(cached, source.key, True, _ms(start))
        return await self.encode(source, timeout, start, max_tokens)

    async def encode(self, source: ImageSource, timeout: float, start: float | None = None,
                     max_tokens: int = 0) -> Embeddings:
        start = start or time.perf_counter()
        encoded = await self.encoder.encode(source.encode_request(max_tokens), source.key, timeout)
        if self.write_back:
            await self.cache.set(embedding_key(encoded.info.fingerprint, source.key), encoded.payload,
                                 self.cache_ttl_s)
        metrics.ENCODE_SECONDS.observe(time.perf_counter() - start)
        return Embeddings(encoded.payload, source.key, encoded.cache_hit, _ms(start))

    def fetcher(self, sources: ImageSource | list[ImageSource], timeout: float, route: str = "") -> "ImageFetch":
        """The request's images (one, several, or none: then `route` keys its decoder)."""
        return ImageFetch(self, [sources] if isinstance(sources, ImageSource) else sources, timeout, route)

    async def call(self, rpc: str, header: llm_decoder_pb2.GenerateHeader, fetch: "ImageFetch", timeout: float,
                   ) -> AsyncIterator:
        """Run `rpc` (Generate or Classify) on the image's decoder. The decoder gets only the image id
        and asks for the payload if it does not hold the image's KV. Once per call, before any reply:
        a payload it finds corrupt (DATA_LOSS) that came from the cache is dropped and re-encoded; a
        payload of another model (FAILED_PRECONDITION: the model was redeployed) makes the gateway
        fetch the fingerprint again and the payload under it."""
        header.image_ids[:] = [source.key for source in fetch.sources]
        await self._admit(fetch, timeout)
        try:
            async for reply in self._routed(rpc, header, fetch, timeout):
                yield reply
        except Upstream as exc:
            await self._recover(exc, fetch, timeout)
            async for reply in self._routed(rpc, header, fetch, timeout):
                yield reply
        finally:
            self.admission.grow(-fetch.held)  # the payloads are let go with the call
            fetch.held = 0

    async def _admit(self, fetch: "ImageFetch", timeout: float) -> None:
        """Before any image is encoded: the images' estimated payloads against what the image's decoder
        advertises it takes (admission.py)."""
        if not fetch.sources:
            return
        replica = self.router.order(fetch.route_key)[0]
        limits = await self.admission.limits(replica, lambda: self.decoders.get(replica).model_info(timeout))
        # a clip counts as the smallest image here; the encoder refuses it over the decoder's tokens (max_tokens)
        fetch.estimate, fetch.budget = self.admission.check(
            limits, [source.data if source.video is None else None for source in fetch.sources])
        fetch.max_tokens = limits.max_tokens if limits is not None else 0

    async def _recover(self, exc: Upstream, fetch: "ImageFetch", timeout: float) -> None:
        """Make the retry after `exc` meaningful, or raise it."""
        if exc.grpc_code == "DATA_LOSS" and fetch.fetched and any(e.cache_hit for e in fetch.embeddings):
            log.warning("a cached payload of %s is corrupt (%s); dropping and re-encoding the cached ones",
                        fetch.route_key, exc)
            fingerprint = await self.fingerprint(timeout)
            for i, (source, emb) in enumerate(zip(fetch.sources, fetch.embeddings)):
                if emb.cache_hit:
                    await self.cache.delete(embedding_key(fingerprint, source.key))
                    fetch.embeddings[i] = await self.encode(source, timeout)
        elif exc.grpc_code == "FAILED_PRECONDITION" and fetch.fetched:
            stale = self._fingerprint
            self._fingerprint = None
            self.admission.forget()
            if await self.fingerprint(timeout) == stale:
                raise exc
            log.warning("the served model changed (%s -> %s); fetching %s's payloads again", stale,
                        self._fingerprint, fetch.route_key)
            fetch.embeddings = []
        else:
            raise exc

    async def _routed(self, rpc: str, header: llm_decoder_pb2.GenerateHeader, fetch: "ImageFetch", timeout: float,
                      ) -> AsyncIterator:
        """On the image's replica; while no reply was passed on, a replica that is gone or
        overloaded hands the request to the next in the image's order (all within one deadline).
        A one-conversation Generate whose replica dies mid-answer migrates (up to migration_limit
        times): the next replica resumes from the tokens already passed on, and the client sees one
        answer. Anything else that fails mid-answer ends with the error, never hangs."""
        deadline = time.monotonic() + timeout
        order = self.router.order(fetch.route_key)
        original = header
        delivered: dict[int, list[int]] = {}  # Generate: answer tokens passed on, per answer (reply.index)
        finished: set[int] = set()
        resumed: dict[int, int] = {}  # tokens each answer was resumed from (its usage counts them generated)
        rows: list[int] | None = None  # the resumed call's answers: their indexes in the original request
        migrations = 0
        for i, replica in enumerate(order):
            DECODER_REQUESTS.labels(replica).inc()
            started = False
            try:
                async for reply in self.decoders.get(replica).negotiate(
                        rpc, header, fetch, max(0.001, deadline - time.monotonic())):
                    if not started:
                        started = True
                        self.router.mark_up(replica)
                    if rows is not None:
                        reply.index = rows[reply.index]
                    if migrations and reply.finish_reason:
                        _count_resumed(reply, resumed.get(reply.index, 0))
                    if rpc == "Generate":
                        delivered.setdefault(reply.index, []).extend(reply.token_ids)
                        if reply.finish_reason:
                            finished.add(reply.index)
                    yield reply
                return
            except (Unavailable, Upstream) as exc:
                reason = failover_reason(exc, order, i)
                if started:
                    if not (reason == "unavailable" and rpc == "Generate" and migrations < self.migration_limit):
                        raise
                    migrations += 1
                    header, rows = _resuming(original, delivered, finished)
                    if header is None:  # every answer had ended: nothing left to resume
                        return
                    resumed = {j: len(delivered.get(j, ())) for j in (rows or [0])}
                    MIGRATIONS.inc()
                    log.warning("decoder %s died mid-answer after %d tokens; resuming %d answer(s) on %s", replica,
                                sum(resumed.values()), len(resumed), order[i + 1])
                FAILOVERS.labels(reason).inc()
                self.router.moved(replica, order[i + 1], reason, exc)

    async def close(self) -> None:
        for watch in self._watches:
            watch.cancel()
        await self.encoder.close()
        await self.decoders.close()
        await self.cache.close()


def _resuming(original: llm_decoder_pb2.GenerateHeader, delivered: dict[int, list[int]], finished: set[int],
              ) -> tuple[llm_decoder_pb2.GenerateHeader | None, list[int] | None]:
    """The header that resumes the answers of `original` still running (None when none is), and for a
    request of several answers (AskMany's batch, n > 1) which original answer each row of it is: the
    unfinished ones, each with the tokens it delivered (and an n > 1 answer with the seed it had)."""
    resumed = llm_decoder_pb2.GenerateHeader()
    resumed.CopyFrom(original)
    if not original.batch and original.n <= 1:
        if 0 in finished:
            return None, None
        resumed.resume_token_ids[:] = delivered.get(0, [])
        return resumed, None
    answers = len(original.batch) or original.n
    rows = [j for j in range(answers) if j not in finished]
    if not rows:
        return None, None
    del resumed.batch[:]
    resumed.ClearField("messages")
    resumed.n = 0
    for j in rows:
        conversation = llm_decoder_pb2.Conversation()
        if original.batch:
            conversation.CopyFrom(original.batch[j])
        else:  # answer j of n: the conversation once more, seeded as its row was (seed + j)
            conversation.messages.extend(original.messages)
            if original.sampling.HasField("seed"):
                conversation.seed = (original.sampling.seed + j) % 2**64
        conversation.resume_token_ids[:] = delivered.get(j, [])
        resumed.batch.append(conversation)
    return resumed, rows


def _count_resumed(reply, resumed: int) -> None:
    """Usage as the client asked for it: the resumed tokens were generated, not prompt."""
    if reply.HasField("usage"):
        reply.usage.prompt_tokens -= resumed
        reply.usage.completion_tokens += resumed


class ImageFetch:
    """The request's image payloads, fetched (cache, else encoder; all images at once) only if a
    decoder asks, and once."""

    def __init__(self, pipeline: Pipeline, sources: list[ImageSource], timeout: float, route: str = ""):
        self.pipeline, self.sources, self.timeout = pipeline, sources, timeout
        self.route_key = sources[0].key if sources else route  # conversations stay on their first image's decoder
        self.embeddings: list[Embeddings] = []
        self.estimate = self.budget = 0  # payload bytes estimated before encoding; the in-flight budget
        self.held = 0  # payload bytes of this request counted in flight (admission.py)
        self.max_tokens = 0  # the most tokens a clip may have: what the decoder takes (0 = unknown)

    @property
    def fetched(self) -> bool:
        return bool(self.embeddings)

    async def __call__(self) -> list[bytes]:
        if not self.fetched:
            if not self.held:
                self.pipeline.admission.hold(self.estimate, self.budget)  # before fetching: refused, nothing held
                self.held = self.estimate
            self.embeddings = list(await asyncio.gather(
                *(self.pipeline.embeddings(source, self.timeout, self.max_tokens) for source in self.sources)))
            actual = sum(len(emb.payload) for emb in self.embeddings)
            if actual > self.held:
                self.pipeline.admission.grow(actual - self.held)
                self.held = actual
        return [emb.payload for emb in self.embeddings]

    @property
    def cache_status(self) -> int:
        """gateway_pb2.CacheStatus: UNSPECIFIED for a request without images; HIT when the tower ran for none of
        them (the decoder held them, or every payload came from the cache); else MISS."""
        if not self.sources:
            return gateway_pb2.CACHE_STATUS_UNSPECIFIED
        hit = all(emb.cache_hit for emb in self.embeddings)
        return gateway_pb2.CACHE_STATUS_HIT if hit else gateway_pb2.CACHE_STATUS_MISS

    @property
    def encode_ms(self) -> float:
        """The slowest image's (they are fetched side by side)."""
        return max((emb.encode_ms for emb in self.embeddings), default=0.0)


def question_message(question: str, source: ImageSource | None = None) -> llm_decoder_pb2.ChatMessage:
    """The one-turn prompt: the image (or clip), then the question."""
    return llm_decoder_pb2.ChatMessage(role="user", content=[
        source.placeholder() if source is not None else ImageSource().placeholder(),
        llm_decoder_pb2.ContentPart(text=question),
    ])


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000
