"""Gateway process: the public gRPC API in front of an encoder, decoder replicas and the embedding cache.

Imports no torch: it only moves bytes, so it starts in about a second and stays small.
"""

from __future__ import annotations

import asyncio
import logging

from shared.cache import safe_store_for
from shared.config import GatewayConfig
from shared.logs import setup_logging
from shared.server import Service, run
from shared.tls import client_tls
from vlsplit.v1 import gateway_pb2_grpc

from .admission import PayloadAdmission
from .auth import REJECTED, REQUESTS, AuthInterceptor, ImageQuota, TokenFile, warn_unbounded_images
from .http import HttpApi, HttpServer
from .pools import ENCODER_REQUESTS, DecoderPool, EncoderPool
from .pipeline import Pipeline
from .rate import ClusterRateLimiter, limiter_for
from .routing import DECODER_REQUESTS, Router
from .servicer import GatewayServicer

log = logging.getLogger("vlsplit.gateway")


def build(config: GatewayConfig) -> Service:
    servicer = GatewayServicer(config)
    for metric in (REQUESTS, REJECTED, DECODER_REQUESTS, ENCODER_REQUESTS):
        metric.limit = config.metrics_label_limit
    # a malformed --decoder fails here, at once
    router = Router(config.decoder, config.replica_down_s, metric=DECODER_REQUESTS)
    encoders = Router(config.encoder, config.replica_down_s, what="encoder", metric=ENCODER_REQUESTS)
    tls = client_tls(config.upstream_tls_ca, config.upstream_tls_cert, config.upstream_tls_key,
                     config.upstream_tls_server_name)
    tokens = (TokenFile(config.auth_tokens, config.auth_requests_per_s, config.auth_images_per_day)
              if config.auth_tokens else None)  # an unreadable token file fails here, at once
    limiter = limiter_for(config.auth_rate_scope, config.redis_timeout_s)
    if tokens is not None:
        warn_unbounded_images(tokens)
    auth = AuthInterceptor(tokens, limiter) if tokens else None  # one rate limiter for gRPC and HTTP
    http = HttpServer(HttpApi(servicer, config, auth), config) if config.http_port >= 0 else None  # binds now

    async def start() -> None:
        # Channels and the Redis client bind to the running event loop, so they are made here.
        store = safe_store_for(config)
        decoders = DecoderPool(router, config.retry_attempts, config.deadline_s, tls)
        encoder = EncoderPool(encoders, config.retry_attempts, config.deadline_s, tls)
        pipeline = Pipeline(encoder, decoders, router, store, config.cache_ttl_s,
                            write_back=config.redis_url == "memory", migration_limit=config.migration_limit,
                            admission=PayloadAdmission(config.max_payload_bytes_in_flight))
        await pipeline.start(config.decoder_resolve_s)
        servicer.quota = ImageQuota(store.redis)
        if isinstance(limiter, ClusterRateLimiter):
            limiter.attach(store.redis)
        servicer.pipeline = pipeline
        if http is not None:
            http.start()
        log.info("gateway ready", extra={"encoder": config.encoder, "decoders": router.replicas,
                                          "http_port": http.port if http else None,
                                          "cache": "memory" if config.redis_url == "memory" else "redis",
                                          "auth": f"{len(tokens.clients)} clients" if tokens else "off",
                                          "rate_scope": config.auth_rate_scope})

    async def stop() -> None:
        if http is not None:
            await http.stop()
        if servicer._pipeline is not None:
            await servicer._pipeline.close()

    return Service(
        names=["vlsplit.v1.Gateway"],
        register=lambda server: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server),
        start=start,
        stop=stop,
        max_message_bytes=max(config.max_image_bytes, config.max_video_bytes) + (1 << 20),
        interceptors=[auth] if auth else [],
    )


def main(config: GatewayConfig) -> None:
    setup_logging("gateway", config.log_level, config.log_json)
    asyncio.run(run(config, build(config)))
