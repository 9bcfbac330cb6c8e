"""Client authentication at the gateway: bearer tokens, scopes, per-token rate limits and image quotas.

The token file (VLSPLIT_AUTH_TOKENS) holds one client per line, never a token itself:

    # name:sha256(token)[:scopes[:requests_per_s[:images_per_day]]]
    moderation:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08:classify,upload:50:100000
    app:60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752

scopes are `ask` (Ask, AskStream, AskMany, Chat, ChatStream; HTTP chat completions), `classify` (Classify, Moderate) and `upload` (UploadImage)
or `*` (default: all); empty limits take the gateway's defaults, 0 = unlimited. `vlsplit token NAME`
makes a token and its line. The file is read again when it changes (at most once a second); a file
that fails to parse keeps the clients it had. Clients send `authorization: Bearer <token>`.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import os
import time
from pathlib import Path

import grpc
from prometheus_client import Counter

from shared.credentials import SCOPES, Client, parse_tokens
from shared.errors import Overloaded, PermissionDenied, Unauthenticated
from shared.interceptor import CLIENT_NAME, wrap_handler
from shared.metrics import BoundedLabel

from .rate import ClusterRateLimiter, RateLimiter

log = logging.getLogger("vlsplit.auth")

METHOD_SCOPE = {method: scope for scope, methods in SCOPES.items() for method in methods}
SERVICE_PREFIX = "/vlsplit.v1.Gateway/"
CHECK_EVERY_S = 1.0
DAY_S = 86400

# By client: the first VLSPLIT_METRICS_LABEL_LIMIT names, the rest as "other".
REQUESTS = BoundedLabel(Counter("vlsplit_gateway_client_requests", "Calls admitted, by client (token name) and method",
                                ["client", "method"]))
REJECTED = BoundedLabel(Counter("vlsplit_gateway_client_rejected",
                                "Calls refused by authentication, scope, rate or quota", ["client", "reason"]))


ANONYMOUS = Client("", frozenset(SCOPES), 0.0, 0)  # auth off: everyone, unlimited
CLIENT: contextvars.ContextVar[Client] = contextvars.ContextVar("vlsplit_client", default=ANONYMOUS)


class TokenFile:
    def __init__(self, path: str, requests_per_s: float, images_per_day: int):
        self.path, self.defaults = path, (requests_per_s, images_per_day)
        self._stamp = self._read_stamp()
        self.clients = parse_tokens(Path(path).read_text(), *self.defaults)  # a bad file at start-up is fatal
        self._checked = time.monotonic()

    def lookup(self, token: str) -> Client | None:
        self._reload_if_changed()
        return self.clients.get(hashlib.sha256(token.encode()).hexdigest())

    def _read_stamp(self):
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if now - self._checked < CHECK_EVERY_S:
            return
        self._checked = now
        try:
            stamp = self._read_stamp()
            if stamp == self._stamp:
                return
            clients = parse_tokens(Path(self.path).read_text(), *self.defaults)
        except (OSError, ValueError) as exc:
            log.warning("token file %s could not be read (%s); keeping the %d clients it had", self.path, exc,
                        len(self.clients))
            return
        self._stamp, self.clients = stamp, clients
        log.info("token file reloaded", extra={"clients": len(clients)})


class ImageQuota:
    """Images a client may send per UTC day; counted in Redis (shared by every gateway replica) when the
    cache is Redis, else in this process."""

    def __init__(self, redis=None, clock=time.time):
        self.redis, self.clock = redis, clock
        self._local: dict[tuple[str, int], int] = {}

    async def take(self, client: Client, images: int = 1) -> None:
        if client.images_per_day <= 0 or images <= 0:
            return
        now = self.clock()
        day = int(now // DAY_S)
        used = await self._add(client.name, day, images)
        if used > client.images_per_day:
            await self._add(client.name, day, -images)  # refused images do not count
            REJECTED.labels(client.name, "quota").inc()
            retry = (day + 1) * DAY_S - now
            raise Overloaded(f"client {client.name!r} used its quota of {client.images_per_day} images per day; "
                             f"it renews at 00:00 UTC, in {retry:.0f} s", retry_after_s=retry)

    async def _add(self, name: str, day: int, n: int) -> int:
        if self.redis is not None:
            key = f"vlsplit:quota:{{{name}}}:{day}"
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.incrby(key, n)
                pipe.expire(key, 2 * DAY_S)
                used, _ = await pipe.execute()
            return int(used)
        key = (name, day)
        self._local = {k: v for k, v in self._local.items() if k[1] >= day}  # yesterday's counts go
        self._local[key] = self._local.get(key, 0) + n
        return self._local[key]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates Gateway calls (health and reflection stay open for probes): UNAUTHENTICATED
    without a known token, PERMISSION_DENIED without the method's scope, RESOURCE_EXHAUSTED over the
    client's rate (with `retry-after-ms`; the rate is this replica's or, with a ClusterRateLimiter, every
    replica's together). The client is in `CLIENT` for the call's handler."""

    def __init__(self, tokens: TokenFile, limiter: RateLimiter | ClusterRateLimiter | None = None):
        self.tokens, self.limiter = tokens, limiter or RateLimiter()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if not details.method.startswith(SERVICE_PREFIX):
            return handler
        method = details.method[len(SERVICE_PREFIX):]
        metadata = dict(details.invocation_metadata or ())

        async def admit() -> Client:
            client = await self.authenticate(metadata.get("authorization", ""), method)
            CLIENT.set(client)
            CLIENT_NAME.set(client.name)
            return client

        def unary(behavior):
            async def wrapped(request, context):
                await admit()
                return await behavior(request, context)
            return wrapped

        def streaming(behavior):
            async def wrapped(request, context):
                await admit()
                async for item in behavior(request, context):
                    yield item
            return wrapped

        return wrap_handler(handler, unary, streaming)

    async def authenticate(self, authorization: str, method: str) -> Client:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            REJECTED.labels("", "unauthenticated").inc()
            raise Unauthenticated("this gateway needs a token: send the metadata 'authorization: Bearer <token>' "
                                  "(vlsplit ask --token ..., or VLSPLIT_TOKEN)")
        client = self.tokens.lookup(token.strip())
        if client is None:
            REJECTED.labels("", "unauthenticated").inc()
            raise Unauthenticated("unknown or revoked token")
        scope = METHOD_SCOPE.get(method, "")
        if scope not in client.scopes:
            REJECTED.labels(client.name, "scope").inc()
            raise PermissionDenied(f"client {client.name!r} lacks the {scope!r} scope that {method} needs "
                                   f"(it has: {', '.join(sorted(client.scopes))})")
        wait = await self.limiter.take(client)
        if wait > 0:
            REJECTED.labels(client.name, "rate").inc()
            raise Overloaded(f"client {client.name!r} is over its rate of {client.requests_per_s:g} requests/s; "
                             f"retry after {wait:.3f} s", retry_after_s=wait)
        REQUESTS.labels(client.name, method).inc()
        return client


def warn_unbounded_images(tokens: TokenFile) -> None:
    """At start: clients without an images_per_day quota may each send new images without end, every one
    an encode and a cache entry, evicting everyone else's (the cache is LRU): say so, naming them."""
    unbounded = sorted(c.name for c in tokens.clients.values() if c.images_per_day <= 0)
    if unbounded:
        log.warning("auth is on but %d of %d clients have no images_per_day quota (VLSPLIT_AUTH_IMAGES_PER_DAY=0 "
                    "and none on their token line): one of them can flush the embedding cache unnoticed; set a "
                    "quota", len(unbounded), len(tokens.clients), extra={"clients": unbounded[:20]})
