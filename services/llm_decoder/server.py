"""Decoder server: start-up (language weights only, then a warm-up generation), health, signals.

`vlsplit serve decoder --model DIR` calls `main`. Health stays NOT_SERVING (and Generate answers
UNAVAILABLE) until the engine is loaded and has generated its warm-up tokens.

Threads: torch's intra-op pool (VLSPLIT_TORCH_THREADS, default every CPU this process may use) runs every
forward, on the engine's one step thread, so forwards never compete for cores; the event loop
only moves bytes, and short CPU work (payload decoding, tokenizing) runs in a small worker pool.
"""

from __future__ import annotations

import asyncio
import logging
import time

from shared.codec import DTYPES
from shared.config import DecoderConfig, EngineConfig
from shared.hardware import Runtime, resolve_dtype, set_torch_threads
from shared.logs import setup_logging
from shared.schema import question_messages
from shared.sampling import SamplingParams
from shared.server import Service, run
from vlsplit.v1 import llm_decoder_pb2, llm_decoder_pb2_grpc

from .engine import DecoderEngine, GenerationInput
from .servicer import LLMDecoderServicer

log = logging.getLogger("vlsplit.decoder")
SERVICE_NAME = llm_decoder_pb2.DESCRIPTOR.services_by_name["LLMDecoder"].full_name
WARMUP = GenerationInput(question_messages("Warm up.", n_images=0), [], SamplingParams(max_new_tokens=2))


def main(config: DecoderConfig) -> None:
    setup_logging("decoder", config.log_level, config.log_json)
    _check(config)
    servicer = LLMDecoderServicer(config)

    async def start() -> None:
        servicer.serve(*await asyncio.to_thread(load_engine, config))

    async def stop() -> None:
        await asyncio.to_thread(servicer.close)

    asyncio.run(run(config, Service(
        names=[SERVICE_NAME],
        register=lambda server: llm_decoder_pb2_grpc.add_LLMDecoderServicer_to_server(servicer, server),
        start=start,
        stop=stop,
        check=lambda: servicer.engine.health() if servicer.engine is not None else None,
    )))


def load_engine(config: DecoderConfig) -> tuple[DecoderEngine, Runtime]:
    start = time.perf_counter()
    dtype = resolve_dtype(config.dtype, config.device)
    threads = set_torch_threads(config.torch_threads)
    engine = DecoderEngine(config.model, dtype=DTYPES[dtype.name], device=config.device,
                           config=engine_config(config))
    runtime = Runtime.of(dtype, threads, config.device, config.quantize, engine.runner.weight_bytes(),
                         backend=f"torch, decode attention {engine.runner.decode_attention}")
    loaded = time.perf_counter()
    for _ in engine.generate(WARMUP):
        pass
    load_s, warmup_s = round(loaded - start, 2), round(time.perf_counter() - loaded, 2)
    fields = runtime.log_fields()
    log.info("decoder ready: %s (%s) fingerprint %s, loaded in %.2fs, warm-up %.2fs, %s",
             config.model, engine.family.model_type, engine.fingerprint, load_s, warmup_s,
             " ".join(f"{k}={v}" for k, v in fields.items()),
             extra={"model": config.model, "model_type": engine.family.model_type, "fingerprint": engine.fingerprint,
                    "device": config.device, "load_s": load_s, "warmup_s": warmup_s, **fields})
    return engine, runtime


def engine_config(config: DecoderConfig) -> EngineConfig:
    """The engine's settings: the DecoderConfig fields of the same names."""
    return EngineConfig(**{name: getattr(config, name) for name in EngineConfig.model_fields})


def _check(config: DecoderConfig) -> None:
    """Refuse to start without a checkpoint, before anything is loaded (the values themselves were checked
    when the config was built: shared/config.py)."""
    if not config.model:
        raise ValueError("the decoder needs a checkpoint: --model DIR or VLSPLIT_MODEL")
