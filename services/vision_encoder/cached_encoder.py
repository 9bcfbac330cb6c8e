"""The encoder's domain logic: the vision engine behind the embedding cache and the upload store.

    encode(image_id, bytes | None):
        single-flight running for image_id? -> join it (it already has the bytes)
        cache GET -> valid entry? -> hit (a corrupt entry is deleted, counted, recomputed)
        bytes from the request, else from the upload store (NotFound: "send the image bytes again")
        single-flight(image_id): cache GET again (a flight may have filled it since) -> load_image
            -> preprocess -> batcher (one forward with other images) -> encode_payload -> cache SET (TTL)

Threads: image decoding (`load_image`), preprocessing (numpy), hashing and payload verification
run in the default thread pool, so a bad image is rejected at once, before it joins a batch, even
while a long encode runs; every tower forward runs in ONE dedicated thread (the engine's), so
batches queue up there and the event loop stays free to answer health checks and stream replies.

Concurrency: concurrent misses on one image are encoded once per process (`singleflight.py`);
misses on different images are batched into one forward, up to the configured limits
(`batcher.py`; batched embeddings are bit-identical to solo ones on CPU, see there).
Across replicas sharing a Redis, a new image is encoded once: the replica that takes a short
Redis lock computes it, the others wait for its cache entry (`replica_flight.py`).

The cache never fails a request (`SafeStore`): with Redis down, look-ups are misses and writes are
skipped. The upload store shares the backend but is not optional: PutImage fails UNAVAILABLE when
its bytes could not be stored, rather than promising an image_id that will not resolve.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram
from PIL import Image

from shared import metrics
from shared.cache import SafeStore, embedding_key, image_key
from shared.codec import DTYPES, FORMAT_VERSION, decode_payload, dtype_name, encode_payload
from shared.errors import BadImage, CorruptPayload, NotFound, Overloaded, TooLarge, Unavailable
from shared.hardware import Runtime
from shared.image_ids import VideoParams, image_id as content_id, scoped_image_id
from shared.images import ImageLimits, load_image
from shared.payload import EmbeddingPayload
from shared.processor import ImageInputs
from shared.video import VideoInputs, VideoLimits, VideoSampling, probe

from .batcher import Batcher, BatchLimits
from .engine import VisionEngine
from .replica_flight import ReplicaFlight
from .singleflight import SingleFlight

log = logging.getLogger("vlsplit.encoder")

ENCODES = Counter("vlsplit_encoder_encodes", "Images run through the vision tower (cache misses that were computed)")
QUEUE_DEPTH = Gauge("vlsplit_encoder_queue_depth",
                    "Images waiting for or in a vision forward on this replica (what autoscaling keys on)")
BATCH_SIZE = Histogram("vlsplit_encoder_batch_size", "Images per vision-tower forward",
                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
_WARMUP_SIZE = (64, 64)


@dataclass(frozen=True)
class ClipRequest:
    """A clip's sampling (resolved and bounded) and the most tokens it may have."""

    sampling: VideoSampling
    limits: VideoLimits


@dataclass(frozen=True)
class Encoded:
    """One image's (or clip's) encoded payload (shared/codec.py bytes) and what the reply says about it."""

    image_id: str
    blob: bytes
    fingerprint: str
    grid_thw: tuple[int, int, int]
    n_tokens: int
    dtype: str
    cache_hit: bool
    encode_ms: float  # vision tower time; 0 on a cache hit
    video: bool = False


@dataclass(frozen=True)
class Upload:
    image_id: str
    ttl_s: int
    width: int
    height: int
    frames: int = 0  # a clip: frames in its packets, and its length
    duration_s: float = 0.0


@dataclass(frozen=True)
class ModelInfo:
    model_type: str
    fingerprint: str
    payload_format: int
    runtime: Runtime  # dtype (and why), threads, device, quantization, weight bytes, backend


class CachedEncoder:
    def __init__(self, engine: VisionEngine, executor: ThreadPoolExecutor, store: SafeStore, runtime: Runtime, *,
                 payload_dtype: str, cache_ttl_s: int, image_ttl_s: int, limits: ImageLimits,
                 video_limits: VideoLimits = VideoLimits(), batch_limits: BatchLimits = BatchLimits(), replica_flight: ReplicaFlight | None = None,
                 max_queue: int = 0):
        self.engine = engine
        self.executor = executor  # the one thread every tower forward runs in (the batcher's)
        self.store = store
        self.runtime = runtime
        self.payload_dtype = DTYPES[payload_dtype]
        self.cache_ttl_s, self.image_ttl_s = cache_ttl_s, image_ttl_s
        self.limits, self.video_limits = limits, video_limits
        self.flights: SingleFlight[str, Encoded] = SingleFlight()
        self.replicas = replica_flight or ReplicaFlight(None, 0)
        self.batcher: Batcher[tuple[str, ImageInputs], Encoded] = Batcher(self._run_tower, executor, batch_limits)
        self.max_queue = max_queue  # images waiting for or in a forward; 0 = unbounded
        self.queued = 0

    @property
    def fingerprint(self) -> str:
        return self.engine.fingerprint

    def model_info(self) -> ModelInfo:
        return ModelInfo(self.engine.family.model_type, self.fingerprint, FORMAT_VERSION, self.runtime)

    def check_size(self, data: bytes, video: bool = False) -> None:
        """Byte-size checks before hashing: an over-limit image is refused even if it is cached."""
        what, limit = ("video", self.video_limits.max_bytes) if video else ("image", self.limits.max_bytes)
        if not data:
            raise BadImage(f"empty {what}: 0 bytes")
        if len(data) > limit:
            raise TooLarge(f"{what} is {len(data)} bytes; the limit is {limit} bytes"
                           + (" (VLSPLIT_MAX_VIDEO_BYTES)" if video else ""))

    def clip_request(self, params: VideoParams, max_tokens: int = 0) -> ClipRequest:
        """A clip's sampling resolved against the checkpoint's defaults and checked against the limits
        (before any byte of it is read); `max_tokens` (the decoder's context) lowers the token bound."""
        limits = self.video_limits
        if max_tokens and max_tokens < limits.max_tokens:
            limits = dataclasses.replace(limits, max_tokens=int(max_tokens),
                                         tokens_setting="the decoder's context, VLSPLIT_MAX_MODEL_LEN")
        sampling = self.engine.video.sampling(limits, params.fps, params.min_frames, params.max_frames,
                                              params.min_pixels, params.max_pixels)
        return ClipRequest(sampling, limits)

    async def image_id_of(self, data: bytes) -> str:
        return await asyncio.to_thread(content_id, data)

    async def encode(self, image_id: str, data: bytes | None = None, content: str | None = None,
                     stored: str | None = None, clip: ClipRequest | None = None) -> Encoded:
        """Embeddings of the image (or with `clip`, the clip sampled so) `image_id`; its bytes come with the
        call or from the upload store (under `stored`, default `image_id`), where they must hash to `content`
        (the content id `image_id` was derived from; default `image_id`)."""
        if self.flights.running(image_id):
            # No await between this check and `do`: the running flight is joined, `work` not called.
            metrics.CACHE.labels("miss").inc()
            return _within(await self.flights.do(image_id, _unreachable), clip)
        cached = await self._cached(image_id, count=True)
        if cached is not None:
            return _within(cached, clip)
        if data is None:
            data = await self._uploaded(stored or image_id, content or image_id)
        return _within(await self.flights.do(image_id, lambda: self._compute(image_id, data, clip)), clip)

    async def put_image(self, data: bytes, scope: str = "", video: bool = False) -> Upload:
        """Validate and keep `data` for `image_ttl_s`, so that Encode can name it by id (in `scope`). A clip
        is probed (container, frames, length, resolution), not decoded."""
        if video:
            self.check_size(data, video=True)
            frames, fps, width, height = await asyncio.to_thread(probe, data, self.video_limits)
            size, extra = (width, height), {"frames": frames, "duration_s": frames / fps}
        else:
            image = await asyncio.to_thread(load_image, data, self.limits)
            size, extra = (image.width, image.height), {}
        image_id = await self.image_id_of(data)
        await self.store.set(image_key(scoped_image_id(scope, image_id)), data, self.image_ttl_s)
        if not self.store.healthy:
            raise Unavailable("the image store is unreachable; send the image bytes with each request instead")
        return Upload(image_id, self.image_ttl_s, *size, **extra)

    async def _uploaded(self, image_id: str, content: str) -> bytes:
        """Stored bytes, re-hashed: bytes that are not the image they are stored as are dropped."""
        key = image_key(image_id)
        data = await self.store.get(key)
        if data is not None and await self.image_id_of(data) != content:
            metrics.CACHE_REJECTED.labels("rehash").inc()
            log.warning("dropping stored image %s: its bytes hash to another image", key, extra={"key": key})
            await self.store.delete(key)
            data = None
        if data is None:
            raise NotFound(f"image {content} is unknown or expired; send the image bytes again")
        return data

    async def _cached(self, image_id: str, count: bool = False) -> Encoded | None:
        """A valid cache entry, or None. A corrupt entry is deleted (and recomputed by the caller)."""
        key = embedding_key(self.fingerprint, image_id)
        blob = await self.store.get(key)
        if blob is None:
            if count:
                metrics.CACHE.labels("miss" if self.store.healthy else "error").inc()
            return None
        try:
            encoded = await asyncio.to_thread(self._describe, image_id, blob)
        except CorruptPayload as exc:
            metrics.CACHE.labels("corrupt").inc()
            log.warning("dropping corrupt cache entry %s: %s", key, exc, extra={"key": key})
            await self.store.delete(key)
            return None
        if count:
            metrics.CACHE.labels("hit").inc()
        return encoded

    def _describe(self, image_id: str, blob: bytes) -> Encoded:
        """Verify a cached `blob` (checksum, shapes, fingerprint) and describe it. Worker thread."""
        payload = decode_payload(blob)
        if payload.fingerprint != self.fingerprint:
            raise CorruptPayload(f"entry was made by model {payload.fingerprint}, this is {self.fingerprint}")
        if payload.image_id != image_id:
            raise CorruptPayload(f"entry under {image_id} holds the payload of image {payload.image_id or '(unnamed)'}")
        return Encoded(image_id, blob, payload.fingerprint, payload.grid_thw, payload.n_tokens,
                       dtype_name(payload.dtype), cache_hit=True, encode_ms=0.0, video=payload.video is not None)

    async def _compute(self, image_id: str, data: bytes, clip: ClipRequest | None = None) -> Encoded:
        cached = await self._cached(image_id)  # a flight that just ended may have filled it
        if cached is not None:
            return cached
        # a bad image or clip fails here, before any lock; a clip is decoded here, never in the tower's thread
        inputs = await asyncio.to_thread(self._inputs, data, clip)

        async def compute() -> Encoded:
            if self.max_queue and self.queued >= self.max_queue:
                raise Overloaded(f"encoder queue full: {self.queued} images wait for the vision tower (the limit "
                                 f"is {self.max_queue}, VLSPLIT_ENCODE_MAX_QUEUE); retry later or on another "
                                 "encoder", retry_after_s=0.5)
            self.queued += 1
            try:
                with QUEUE_DEPTH.track_inprogress():
                    encoded = await self.batcher.submit((image_id, inputs), cost=inputs.pixel_values.shape[0])
            finally:
                self.queued -= 1
            await self.store.set(embedding_key(self.fingerprint, image_id), encoded.blob, self.cache_ttl_s)
            return encoded

        return await self.replicas.run(embedding_key(self.fingerprint, image_id), compute,
                                       lambda: self._cached(image_id))

    def _inputs(self, data: bytes, clip: ClipRequest | None = None) -> ImageInputs | VideoInputs:
        """Worker thread: bytes -> validated image (or sampled clip) -> pixel patches (BadImage/TooLarge here,
        alone)."""
        if clip is not None:
            return self.engine.video.preprocess(data, clip.sampling, clip.limits)
        return self.engine.preprocessor(load_image(data, self.limits))

    def _run_tower(self, jobs: list[tuple[str, ImageInputs]]) -> list[Encoded]:
        """Engine thread: one forward for the batch -> one payload -> codec bytes per image."""
        start = time.perf_counter()
        payloads = self.engine.encode_inputs([inputs for _, inputs in jobs])
        seconds = time.perf_counter() - start
        ENCODES.inc(len(jobs))
        BATCH_SIZE.observe(len(jobs))
        return [self._encoded(image_id, payload, seconds, len(jobs)) for (image_id, _), payload in zip(jobs, payloads)]

    def _encoded(self, image_id: str, payload: EmbeddingPayload, seconds: float, batch: int) -> Encoded:
        """One image of a batch; its encode time is the batch's forward time."""
        metrics.ENCODE_SECONDS.observe(seconds)
        blob = encode_payload(payload.named(image_id), self.payload_dtype)
        log.info("encoded %s: grid %s, %d tokens in %.0f ms (batch of %d)", image_id[:12], list(payload.grid_thw),
                 payload.n_tokens, seconds * 1000, batch,
                 extra={"image_id": image_id, "encode_ms": round(seconds * 1000, 1), "batch": batch})
        return Encoded(image_id, blob, payload.fingerprint, payload.grid_thw, payload.n_tokens,
                       dtype_name(self.payload_dtype), cache_hit=False, encode_ms=seconds * 1000,
                       video=payload.video is not None)

    def warm_up(self) -> None:
        """Engine thread: one forward pass on a small synthetic image (first-call allocations)."""
        image = Image.linear_gradient("L").resize(_WARMUP_SIZE).convert("RGB")
        payload = self.engine.encode([image])[0]
        decode_payload(encode_payload(payload, self.payload_dtype))


def _within(encoded: Encoded, clip: ClipRequest | None) -> Encoded:
    """A clip's payload, also from the cache or another request's flight, under this request's token bound."""
    if clip is not None and encoded.n_tokens > clip.limits.max_tokens:
        raise TooLarge(f"the clip is {encoded.n_tokens} tokens; the limit is {clip.limits.max_tokens} "
                       f"({clip.limits.tokens_setting}; lower fps or max_pixels)")
    return encoded


async def _unreachable() -> Encoded:
    raise AssertionError("single-flight joined a flight that had already ended")
