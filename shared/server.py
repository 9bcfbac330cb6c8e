"""The server skeleton the three services share.

Start-up order: gRPC port open with health NOT_SERVING -> weights loaded and a warm-up forward pass
run (in a thread, so health checks are answered meanwhile) -> SERVING. On SIGTERM/SIGINT, the drain:
health NOT_SERVING at once, but new calls are still accepted for `drain_s` (load balancers and
client-side pickers need a moment to notice; Kubernetes keeps routing to a terminating pod until
its endpoints update), then the server stops accepting and in-flight calls get `grace_s` to finish,
then the process exits. A second signal during the drain ends it at once (Ctrl-C twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .config import ServerConfig
from .interceptor import Calls, ErrorInterceptor
from .metrics import serve_metrics
from .tls import is_loopback, server_tls

log = logging.getLogger("vlsplit.server")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Service:
    """What a service plugs into the skeleton."""

    names: list[str]  # full gRPC service names, e.g. "vlsplit.v1.VisionEncoder"
    register: Callable[[grpc.aio.Server], None]  # adds the servicer(s)
    start: Callable[[], Awaitable[None]]  # load weights / connect, then warm up; raises on failure
    stop: Callable[[], Awaitable[None]] | None = None  # release resources after the server stopped
    max_message_bytes: int = 4 << 20  # largest single request message accepted
    interceptors: list = field(default_factory=list)  # inside the error interceptor, e.g. authentication
    # Once serving, polled every `check_every_s`: a reason why the service cannot serve (e.g. its engine's
    # loop died or a step is stuck) turns health NOT_SERVING until it returns None again.
    check: Callable[[], str | None] | None = None
    check_every_s: float = 1.0


async def run(config: ServerConfig, service: Service) -> None:
    options = [("grpc.max_receive_message_length", service.max_message_bytes),
               ("grpc.max_send_message_length", service.max_message_bytes)]
    calls = Calls()
    server = grpc.aio.server(interceptors=[ErrorInterceptor(calls), *service.interceptors], options=options,
                             maximum_concurrent_rpcs=config.max_concurrent_rpcs or None)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service.register(server)
    reflection.enable_server_reflection(
        service.names + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server)
    for name in ["", *service.names]:
        await health_servicer.set(name, NOT_SERVING)
    port = _add_port(server, config)
    health_server, health_port = await _health_only_server(config, health_servicer)
    await server.start()
    metrics_port = serve_metrics(config.host, config.metrics_port)
    log.info("listening", extra={"port": port, "metrics_port": metrics_port, "health_port": health_port,
                                 "tls": bool(config.tls_cert), "mutual_tls": bool(config.tls_client_ca)})
    stopping = _stop_event()

    start = time.perf_counter()
    try:
        await service.start()
    except BaseException:  # a start that fails (bad checkpoint, Redis refused) ends the process: stop listening
        await server.stop(None)
        if health_server is not None:
            await health_server.stop(None)
        raise
    for name in ["", *service.names]:
        await health_servicer.set(name, SERVING)
    log.info("serving", extra={"port": port, "startup_s": round(time.perf_counter() - start, 2)})
    if config.port_file:
        _write_port_file(config.port_file, port, metrics_port, health_port)

    watch = asyncio.create_task(_watch(service, health_servicer)) if service.check else None
    await stopping.wait()
    if watch is not None:
        watch.cancel()
    await health_servicer.enter_graceful_shutdown()  # every service name NOT_SERVING
    if config.drain_s > 0:
        log.info("draining: health NOT_SERVING, still serving for %.1fs (signal again to skip)", config.drain_s)
        stopping.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(config.drain_s):
                await stopping.wait()
    log.info("stopping: no new calls, %.1fs grace for %d in-flight calls", config.grace_s, calls.count)
    await _stop(server, calls, config.grace_s)
    if health_server is not None:
        await health_server.stop(None)
    if service.stop:
        await service.stop()
    log.info("stopped")


async def _stop(server: grpc.aio.Server, calls: Calls, grace_s: float) -> None:
    """Stop accepting calls, give the ones in progress `grace_s` to finish, then end what is left. Health
    watches never end by themselves (every gateway keeps one open to each replica), so the stop does not
    wait out the grace for them: it ends as soon as the last call of the service's own has finished."""
    stopping = asyncio.ensure_future(server.stop(grace_s))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(grace_s):
            while True:
                await calls.finished()
                await asyncio.sleep(0.05)  # a call the server took just before the stop may not be counted yet
                if calls.count == 0:
                    break
    await server.stop(0)  # cancels the open-ended streams (and, past the grace, whatever still runs)
    await stopping


async def _watch(service: Service, health_servicer) -> None:
    """Health follows `service.check` while serving: NOT_SERVING (logged) while it names a reason."""
    failing: str | None = None
    while True:
        await asyncio.sleep(service.check_every_s)
        try:
            reason = service.check()
        except Exception as exc:  # noqa: BLE001 - a check that breaks is a failing check
            reason = f"health check failed: {type(exc).__name__}: {exc}"
        if reason != failing:
            status = NOT_SERVING if reason else SERVING
            for name in ["", *service.names]:
                await health_servicer.set(name, status)
            if reason:
                log.error("NOT_SERVING: %s", reason)
            else:
                log.warning("serving again: %s cleared", failing)
            failing = reason


def _add_port(server: grpc.aio.Server, config: ServerConfig) -> int:
    address = f"{config.host}:{config.port}"
    tls = server_tls(config.tls_cert, config.tls_key, config.tls_client_ca)
    if tls is not None:
        return server.add_secure_port(address, tls.credentials())
    if not is_loopback(config.host):
        log.warning("serving plaintext gRPC on %s, which is not a loopback address: anyone who can reach it can "
                    "call it and read the traffic; set VLSPLIT_TLS_CERT and VLSPLIT_TLS_KEY (and "
                    "VLSPLIT_TLS_CLIENT_CA for mutual TLS)", config.host)
    return server.add_insecure_port(address)


async def _health_only_server(config: ServerConfig, health_servicer) -> tuple[grpc.aio.Server | None, int]:
    """The plaintext health port (config.health_port >= 0): the Health service and nothing else."""
    if config.health_port < 0:
        return None, -1
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(f"{config.host}:{config.health_port}")
    await server.start()
    return server, port


def _stop_event() -> asyncio.Event:
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event


def _write_port_file(path: str, port: int, metrics_port: int, health_port: int) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps({"port": port, "metrics_port": metrics_port, "health_port": health_port}))
    tmp.replace(path)  # atomic: a reader never sees a half-written file
