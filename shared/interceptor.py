"""The one place that turns exceptions into gRPC status codes, and counts every RPC.

Handlers raise typed `VlsplitError`s; this maps them with their `grpc_code`. Anything else is a
bug of ours: logged with its traceback and answered INTERNAL, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time

import grpc

from . import metrics
from .errors import VlsplitError

log = logging.getLogger("vlsplit.rpc")
# The authenticated caller's name (the gateway's token name), for logs; "" when there is none.
CLIENT_NAME: contextvars.ContextVar[str] = contextvars.ContextVar("vlsplit_client_name", default="")


# Streams a client keeps open for as long as it likes (the health watches of gateways and balancers,
# reflection sessions): a server that stops does not wait for them to end.
OPEN_ENDED = frozenset({
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
})


class Calls:
    """The calls in progress that a stopping server waits for (every RPC but the OPEN_ENDED ones)."""

    def __init__(self):
        self.count = 0
        self._none = asyncio.Event()
        self._none.set()

    def enter(self) -> None:
        self.count += 1
        self._none.clear()

    def exit(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._none.set()

    async def finished(self) -> None:
        await self._none.wait()


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, calls: Calls | None = None):
        self.calls = calls

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method.rsplit("/", 1)[-1]
        calls = None if details.method in OPEN_ENDED else self.calls
        return wrap_handler(handler, lambda behavior: _unary(behavior, method, calls),
                            lambda behavior: _streaming(behavior, method, calls))


def wrap_handler(handler, unary, streaming):
    """`handler` with its behavior wrapped: `unary(behavior)` for unary-response methods, `streaming`
    for response-streaming ones (stream-unary: none of our services has one)."""
    if handler is None:
        return None
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            streaming(handler.unary_stream), handler.request_deserializer, handler.response_serializer)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(
            streaming(handler.stream_stream), handler.request_deserializer, handler.response_serializer)
    return handler


def _unary(behavior, method: str, calls: Calls | None = None):
    async def wrapped(request, context):
        with _Track(method, calls) as track:
            try:
                return await behavior(request, context)
            except BaseException as exc:  # noqa: BLE001 - classified and re-raised by _fail
                await track.fail(exc, context)
    return wrapped


def _streaming(behavior, method: str, calls: Calls | None = None):
    if inspect.iscoroutinefunction(behavior):  # writes with context.write(), e.g. health's Watch
        return _unary(behavior, method, calls)

    async def wrapped(request, context):
        with _Track(method, calls) as track:
            try:
                async for item in behavior(request, context):
                    yield item
            except BaseException as exc:  # noqa: BLE001
                await track.fail(exc, context)
    return wrapped


class _Track:
    """Counts one RPC: in-flight gauge (and `calls`), latency, and its final status code."""

    def __init__(self, method: str, calls: Calls | None = None):
        self.method, self.calls = method, calls
        self.code = "OK"

    def __enter__(self):
        self.start = time.perf_counter()
        metrics.IN_FLIGHT.labels(self.method).inc()
        if self.calls:
            self.calls.enter()
        return self

    def __exit__(self, *exc):
        if self.calls:
            self.calls.exit()
        metrics.IN_FLIGHT.labels(self.method).dec()
        metrics.LATENCY.labels(self.method).observe(time.perf_counter() - self.start)
        metrics.REQUESTS.labels(self.method, self.code).inc()

    async def fail(self, exc: BaseException, context) -> None:
        if isinstance(exc, VlsplitError):
            self.code = exc.grpc_code
            log.info("%s -> %s: %s", self.method, exc.grpc_code, exc, extra={"client": CLIENT_NAME.get()})
            retry_after_s = getattr(exc, "retry_after_s", None)
            if retry_after_s is not None:
                context.set_trailing_metadata((("retry-after-ms", str(max(1, round(retry_after_s * 1000)))),))
            await context.abort(getattr(grpc.StatusCode, exc.grpc_code), str(exc))
        if isinstance(exc, grpc.aio.AbortError):  # a handler aborted with its own status
            self.code = context.code().name if context.code() else "UNKNOWN"
            raise exc
        if isinstance(exc, (GeneratorExit, KeyboardInterrupt, SystemExit)) or _cancelled(exc):
            self.code = "CANCELLED"
            raise exc
        self.code = "INTERNAL"
        log.exception("%s failed with an unexpected error", self.method)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see server logs")


def _cancelled(exc: BaseException) -> bool:
    return isinstance(exc, asyncio.CancelledError)
