"""`vlsplit serve encoder`: the vision-encoder gRPC server.

Start-up (shared/server.py does health, reflection, metrics and SIGTERM): the port opens with
health NOT_SERVING; the visual weights load and one warm-up encode runs in the engine thread;
only then does health turn SERVING. Requests that arrive earlier get UNAVAILABLE ("loading").

Batching: misses on different images share one tower forward (encode_max_batch images,
encode_max_wait_ms, encode_max_batch_patches; batcher.py).

Replicas: single-flight is in-process only, so N replicas may encode the same new image up to N
times; the results are identical and the cache keeps one (see cached_encoder.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from urllib.parse import urlsplit

from shared.cache import safe_store_for
from shared.codec import DTYPES
from shared.config import MiB, EncoderConfig
from shared.hardware import Runtime, resolve_dtype, set_torch_threads
from shared.images import ImageLimits
from shared.video import VideoLimits
from shared.logs import setup_logging
from shared.server import Service, run
from shared.tls import server_tls
from vlsplit.v1 import vision_encoder_pb2_grpc

from .batcher import BatchLimits
from .cached_encoder import CachedEncoder
from .engine import VisionEngine
from .openvino_backend import import_openvino
from .replica_flight import ReplicaFlight
from .servicer import SERVICE_NAME, VisionEncoderServicer

log = logging.getLogger("vlsplit.encoder")


def main(config: EncoderConfig) -> None:
    setup_logging("encoder", config.log_level, config.log_json)
    asyncio.run(run(config, encoder_service(config)))


def encoder_service(config: EncoderConfig) -> Service:
    _check(config)
    servicer = VisionEncoderServicer()
    # Every torch call (load, warm-up, encode) runs in this one thread.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vision-engine")

    async def start() -> None:
        servicer.attach(await _open(config, executor))

    async def stop() -> None:
        if servicer.encoder is not None:
            await servicer.encoder.store.close()
        executor.shutdown(wait=False, cancel_futures=True)

    return Service(
        names=[SERVICE_NAME],
        register=lambda server: vision_encoder_pb2_grpc.add_VisionEncoderServicer_to_server(servicer, server),
        start=start,
        stop=stop,
        # Images and clips arrive in one message; payloads leave in 1 MiB chunks.
        max_message_bytes=max(config.max_image_bytes, config.max_video_bytes) + MiB,
    )


def video_limits(config: EncoderConfig) -> VideoLimits:
    return VideoLimits(max_bytes=config.max_video_bytes, max_duration_s=config.max_video_seconds,
                       max_frames=config.max_video_frames, max_frame_pixels=config.max_video_frame_pixels,
                       max_tokens=config.max_video_tokens, decode_timeout_s=config.video_decode_timeout_s,
                       max_fps=config.max_video_fps, max_source_frames=config.max_video_source_frames)


async def _open(config: EncoderConfig, executor: ThreadPoolExecutor) -> CachedEncoder:
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    dtype = resolve_dtype(config.dtype, config.device)
    threads = set_torch_threads(config.torch_threads)  # the tower's forwards run one at a time (batcher.py)
    engine = await loop.run_in_executor(executor, partial(
        VisionEngine, config.model, DTYPES[dtype.name], config.device, quantize=config.quantize,
        backend=config.encoder_backend, openvino_cache_dir=config.openvino_cache_dir or None))
    loaded_s = time.perf_counter() - start
    runtime = Runtime.of(dtype, threads, config.device, config.quantize, engine.weight_bytes(),
                         backend=engine.backend_name())
    store = safe_store_for(config)
    payload_dtype = config.payload_dtype or dtype.name
    encoder = CachedEncoder(
        engine, executor, store, runtime,
        payload_dtype=payload_dtype,
        cache_ttl_s=config.cache_ttl_s,
        image_ttl_s=config.image_ttl_s,
        limits=ImageLimits(max_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels),
        video_limits=video_limits(config),
        batch_limits=_batch_limits(config),
        replica_flight=ReplicaFlight(store.redis, config.encode_lock_s),
        max_queue=config.encode_max_queue,
    )
    start = time.perf_counter()
    await loop.run_in_executor(executor, encoder.warm_up)
    fields = {"model_type": engine.family.model_type, "fingerprint": engine.fingerprint,
              "cache": _backend(config.redis_url), "load_s": round(loaded_s, 2),
              "warmup_s": round(time.perf_counter() - start, 2), **runtime.log_fields()}
    log.info("vision encoder ready: %s", " ".join(f"{k}={v}" for k, v in fields.items()),
             extra={**fields, "model": config.model, "payload_dtype": payload_dtype,
                    "encode_max_batch": config.encode_max_batch, "encode_max_wait_ms": config.encode_max_wait_ms})
    return encoder


def _check(config: EncoderConfig) -> None:
    """What the machine must provide fails at start, before the port opens (the values themselves were
    checked when the config was built: shared/config.py)."""
    if not config.model:
        raise ValueError("the encoder needs a checkpoint: --model DIR or VLSPLIT_MODEL")
    if config.encoder_backend == "openvino":
        import_openvino()  # a missing package fails here, naming the setting and the install command
    server_tls(config.tls_cert, config.tls_key, config.tls_client_ca)


def _batch_limits(config: EncoderConfig) -> BatchLimits:
    return BatchLimits(max_batch=config.encode_max_batch, max_wait_s=config.encode_max_wait_ms / 1000,
                       max_cost=config.encode_max_batch_patches)


def _backend(url: str) -> str:
    """The cache backend for the log, without credentials."""
    if url == "memory":
        return url
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"
