"""The embedding cache and the upload store: Redis, or an in-process LRU ("memory").

Keys (ARCHITECTURE.md contract 3):
  vlsplit:emb:v<format>:<fingerprint>:<image_id>   encoded embedding payload (shared/codec.py)
  vlsplit:img:<image_id>                           uploaded image bytes, for Ask(image_id)

A cache must never fail a request: when Redis is down or slow (short socket timeouts), reads are
misses and writes are skipped; the first failure is logged, every failure is counted in
`vlsplit_cache_errors_total`, and recovery is logged once when Redis answers again.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from . import metrics
from .version import PAYLOAD_FORMAT

log = logging.getLogger("vlsplit.cache")


def embedding_key(fingerprint: str, image_id: str) -> str:
    return f"vlsplit:emb:v{PAYLOAD_FORMAT}:{fingerprint}:{image_id}"


def image_key(image_id: str) -> str:
    return f"vlsplit:img:{image_id}"


class Store(Protocol):
    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes, ttl_s: int) -> None: ...
    async def delete(self, key: str) -> None: ...
    async def close(self) -> None: ...


class MemoryStore:
    """LRU bounded in bytes, with per-entry expiry. One per process."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used = 0
        self.entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    async def get(self, key: str) -> bytes | None:
        entry = self.entries.get(key)
        if entry is None or entry[1] < time.monotonic():
            await self.delete(key)
            return None
        self.entries.move_to_end(key)
        return entry[0]

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        await self.delete(key)
        if len(value) > self.max_bytes:
            return
        self.entries[key] = (value, time.monotonic() + ttl_s)
        self.used += len(value)
        while self.used > self.max_bytes:
            _, (old, _) = self.entries.popitem(last=False)
            self.used -= len(old)

    async def delete(self, key: str) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.used -= len(entry[0])

    async def close(self) -> None:
        self.entries.clear()


class RedisStore:
    def __init__(self, url: str, timeout_s: float):
        self.url = url
        self.client = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    async def get(self, key: str) -> bytes | None:
        return await self.client.get(key)

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        await self.client.set(key, value, ex=ttl_s)

    async def delete(self, key: str) -> None:
        await self.client.delete(key)

    async def close(self) -> None:
        await self.client.aclose()


def open_store(url: str, timeout_s: float, memory_bytes: int) -> Store:
    """`memory` -> in-process LRU; `redis://...` -> Redis (connects lazily)."""
    if url == "memory":
        return MemoryStore(memory_bytes)
    return RedisStore(url, timeout_s)


class SafeStore:
    """Wraps a Store so that backend failures become misses / skipped writes, counted and logged."""

    def __init__(self, store: Store):
        self.store = store
        self.healthy = True

    async def get(self, key: str) -> bytes | None:
        return await self._call("get", self.store.get(key))

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        await self._call("set", self.store.set(key, value, ttl_s))

    async def delete(self, key: str) -> None:
        await self._call("delete", self.store.delete(key))

    async def close(self) -> None:
        await self.store.close()

    async def _call(self, op: str, awaitable):
        try:
            result = await awaitable
        except (RedisError, OSError) as exc:
            metrics.CACHE_ERRORS.labels(op).inc()
            if self.healthy:
                log.warning("cache backend failed (%s: %s); serving without the cache until it recovers",
                            type(exc).__name__, exc)
            self.healthy = False
            return None
        if not self.healthy:
            log.warning("cache backend recovered")
            self.healthy = True
        return result
