"""The embedding cache and the upload store: Redis, or an in-process LRU ("memory").

Keys:
  vlsplit:emb:v<format>:{<fingerprint>:<image_id>}   encoded embedding payload (shared/codec.py)
  vlsplit:img:{<image_id>}                           uploaded image bytes, for Ask(image_id)
The braces are a Redis Cluster hash tag: an entry's parts (below) and its replica lock hash to its
slot, so every multi-key command stays within one slot. `redis+cluster://host:port` (or
`rediss+cluster://`) uses redis-py's cluster client; any node of the cluster will do as the seed.

Redis refuses a value over its proto-max-bulk-len (512 MB by default), and the largest image's
float32 payload can pass that (Qwen3-VL-2B: 537 MB). A value over `part_bytes` is stored as parts
under `<key>:part:<nonce>:<i>` with a small manifest under `<key>` (shared/manifest.py: each part's
length and sha256, sealed with the HMAC key when there is one), all in one MULTI/EXEC with the same
TTL; a read with any part missing is a miss. A manifest is checked (MAC, shape, at most
`max_entry_bytes / part_bytes` parts) before any part is read: one that fails is dropped, never followed.

With a key (VLSPLIT_CACHE_HMAC_KEY, the same on every service), every value is stored as
`vls1 + HMAC-SHA256(key, cache key + value) + value`: the MAC binds the value to its key, which names
the model fingerprint and the image id, so an entry written by anyone without the key (or moved
under another key) is dropped on read, counted in `vlsplit_cache_rejected_total`, and recomputed.
Placeholder and weak keys (the one in .env.example, under 32 bytes, few distinct characters) are
refused at start.

A cache must never fail a request: when Redis is down or slow (short socket timeouts), reads are
misses and writes are skipped; the first failure is logged, every failure is counted in
`vlsplit_cache_errors_total`, and recovery is logged once when Redis answers again.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from typing import Protocol

import redis.asyncio as aioredis
from cachetools import TLRUCache
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from . import metrics
from .manifest import MARK, Manifest, PartBound, Rejected, read as read_manifest
from .version import PAYLOAD_FORMAT

log = logging.getLogger("vlsplit.cache")
PART_BYTES = 64 << 20  # Redis values above this are stored in parts
MAX_ENTRY_BYTES = 2048 << 20  # the largest value cached: bounds a manifest to MAX_ENTRY_BYTES / PART_BYTES parts


def embedding_key(fingerprint: str, image_id: str) -> str:
    return f"vlsplit:emb:v{PAYLOAD_FORMAT}:{{{fingerprint}:{image_id}}}"


def image_key(image_id: str) -> str:
    return f"vlsplit:img:{{{image_id}}}"


class Store(Protocol):
    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes, ttl_s: int) -> None: ...
    async def delete(self, key: str) -> None: ...
    async def close(self) -> None: ...


class MemoryStore:
    """LRU bounded in bytes, with per-entry expiry. One per process.

    A cachetools TLRUCache: each entry is (value, expiry on the monotonic clock), its time-to-use the
    expiry it was set with and its size its value's length; the least recently used entries go first
    when the bytes are over `max_bytes` (expired ones before any), and a value over it is not stored."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: TLRUCache[str, tuple[bytes, float]] = TLRUCache(
            maxsize=max_bytes, ttu=lambda _key, entry, _now: entry[1], timer=time.monotonic,
            getsizeof=lambda entry: len(entry[0]))

    @property
    def used(self) -> int:
        """The bytes held (expired entries included until they are dropped)."""
        return int(self.entries.currsize)

    async def get(self, key: str) -> bytes | None:
        self.entries.expire()  # expired entries are dropped, as on a write
        entry = self.entries.get(key)
        return None if entry is None else entry[0]

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        await self.delete(key)
        if len(value) > self.max_bytes:
            return
        self.entries[key] = (value, time.monotonic() + ttl_s)

    async def delete(self, key: str) -> None:
        self.entries.pop(key, None)

    async def close(self) -> None:
        self.entries.clear()


CLUSTER_SCHEMES = {"redis+cluster://": "redis://", "rediss+cluster://": "rediss://"}


class RedisStore:
    def __init__(self, url: str, timeout_s: float, part_bytes: int = PART_BYTES, password: str = "",
                 username: str = "", tls_ca: str = "", tls_cert: str = "", tls_key: str = "",
                 max_entry_bytes: int = MAX_ENTRY_BYTES, signer: "Signer | None" = None):
        """`signer` seals and checks parts manifests (SafeStore seals the values themselves)."""
        self.url, self.part_bytes, self.signer = url, part_bytes, signer
        self.bound = PartBound(part_bytes, max_entry_bytes)
        options = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        # Credentials in the URL win: redis-py lets URL options override keyword ones.
        options.update({k: v for k, v in (("password", password), ("username", username)) if v})
        if url.startswith(("rediss://", "rediss+cluster://")):
            options.update({k: v for k, v in (("ssl_ca_certs", tls_ca), ("ssl_certfile", tls_cert),
                                               ("ssl_keyfile", tls_key)) if v})
        elif tls_ca or tls_cert:
            raise ValueError(f"Redis TLS files are set but the URL {url.split('@')[-1]!r} is not rediss://")
        scheme = next((s for s in CLUSTER_SCHEMES if url.startswith(s)), None)
        self.cluster = scheme is not None
        if self.cluster:
            self.client = RedisCluster.from_url(CLUSTER_SCHEMES[scheme] + url[len(scheme):], **options)
        else:
            self.client = aioredis.Redis.from_url(url, **options)

    async def get(self, key: str) -> bytes | None:
        value = await self.client.get(key)
        if value is None or not value.startswith(MARK):
            return value
        try:
            manifest = read_manifest(key, value, self.signer, self.bound)  # before any part is read
        except Rejected as exc:
            self._reject(key, str(exc))
            await self.client.delete(key)  # its parts, if any, expire with their TTL
            return None
        pieces = await self.client.mget(manifest.part_keys(key))
        if any(piece is None for piece in pieces):
            return None  # a part expired or was evicted before its manifest
        if not await asyncio.to_thread(manifest.matches, pieces):
            self._reject(key, "a part that does not match its manifest's digest")
            await self.client.delete(key, *manifest.part_keys(key))
            return None
        return b"".join(pieces)

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        if len(value) <= self.part_bytes:
            await self.client.set(key, value, ex=ttl_s)
            return
        if len(value) > self.bound.max_entry_bytes:
            log.warning("not caching %s: %d bytes, over VLSPLIT_CACHE_MAX_ENTRY_BYTES (%d)", key, len(value),
                        self.bound.max_entry_bytes, extra={"key": key})
            return
        manifest, pieces = await asyncio.to_thread(Manifest.split, secrets.token_hex(8), value, self.part_bytes)
        # parts before the manifest; a cluster pipeline sends them in order to the slot's node
        async with self.client.pipeline(transaction=not self.cluster) as pipe:
            for part_key, piece in zip(manifest.part_keys(key), pieces):
                pipe.set(part_key, piece, ex=ttl_s)
            pipe.set(key, manifest.seal(key, self.signer), ex=ttl_s)
            await pipe.execute()

    async def delete(self, key: str) -> None:
        value = await self.client.get(key)
        parts: list[str] = []
        if value is not None and value.startswith(MARK):
            try:
                parts = read_manifest(key, value, self.signer, self.bound).part_keys(key)
            except Rejected:
                pass  # never followed: its parts (if any) expire with their TTL
        await self.client.delete(key, *parts)

    async def close(self) -> None:
        await self.client.aclose()

    def _reject(self, key: str, why: str) -> None:
        metrics.CACHE_REJECTED.labels("manifest").inc()
        log.warning("dropping cache entry %s unread: %s", key, why, extra={"key": key, "reason": "manifest"})


def open_store(url: str, timeout_s: float, memory_bytes: int, part_bytes: int = PART_BYTES,
               max_entry_bytes: int = MAX_ENTRY_BYTES, signer: "Signer | None" = None, **auth: str) -> Store:
    """`memory` -> in-process LRU; `redis://...` -> Redis; `redis+cluster://...` -> Redis Cluster.
    `signer` seals parts manifests; `auth`: password, username, tls_ca, tls_cert, tls_key (used when the
    URL carries none)."""
    if url == "memory":
        return MemoryStore(memory_bytes)
    return RedisStore(url, timeout_s, part_bytes, max_entry_bytes=max_entry_bytes, signer=signer, **auth)


def safe_store_for(config) -> "SafeStore":
    """The store a service's config describes (its redis_* and cache fields), failures absorbed and
    values (and parts manifests) signed when it has a cache_hmac_key."""
    key = config.cache_hmac_key.get_secret_value()
    signer = Signer(key) if key else None
    return SafeStore(store_for(config, signer), signer)


def store_for(config, signer: "Signer | None" = None) -> Store:
    """The store a service's config describes (its redis_* and cache fields)."""
    return open_store(config.redis_url, config.redis_timeout_s, config.memory_cache_bytes, config.cache_part_bytes,
                      config.cache_max_entry_bytes, signer, password=config.redis_password.get_secret_value(),
                      username=config.redis_username, tls_ca=config.redis_tls_ca, tls_cert=config.redis_tls_cert,
                      tls_key=config.redis_tls_key)


class Signer:
    """HMAC-SHA256 envelopes for cache values, bound to their cache key."""

    MAGIC = b"vls1"
    MIN_KEY_BYTES = 32
    MIN_DISTINCT = 8  # a random hex key of 32 characters has about 14
    PLACEHOLDERS = (b"change-me", b"changeme", b"replace-me", b"placeholder", b"example")  # as in .env.example

    def __init__(self, key: str | bytes):
        key = key.encode() if isinstance(key, str) else key
        weakness = self.weakness(key)
        if weakness:
            raise ValueError(f"the cache HMAC key (VLSPLIT_CACHE_HMAC_KEY) {weakness}: set a random one, "
                             f"e.g. `openssl rand -hex 32`, the same on encoders and gateways")
        self.key = key

    @classmethod
    def weakness(cls, key: bytes) -> str:
        """Why `key` must not sign anything, or ""."""
        if len(key) < cls.MIN_KEY_BYTES:
            return f"is {len(key)} bytes; at least {cls.MIN_KEY_BYTES} are required"
        if any(word in key.lower() for word in cls.PLACEHOLDERS):
            return "is a placeholder (like the value in .env.example)"
        if len(set(key)) == 1:
            return "is one character repeated"
        if len(set(key)) < cls.MIN_DISTINCT:
            return f"has only {len(set(key))} distinct characters (at least {cls.MIN_DISTINCT})"
        return ""

    def _mac(self, cache_key: str, value) -> bytes:
        mac = hmac.new(self.key, cache_key.encode() + b"\0", hashlib.sha256)
        mac.update(value)
        return mac.digest()

    def seal(self, cache_key: str, value: bytes) -> bytes:
        return self.MAGIC + self._mac(cache_key, value) + value

    def open(self, cache_key: str, blob: bytes) -> tuple[bytes | None, str]:
        """(value, "") when `blob` is sealed for `cache_key` with this key, else (None, why)."""
        if not blob.startswith(self.MAGIC) or len(blob) < len(self.MAGIC) + 32:
            return None, "unsigned"
        start = len(self.MAGIC) + 32
        value = memoryview(blob)[start:]
        if not hmac.compare_digest(blob[len(self.MAGIC):start], self._mac(cache_key, value)):
            return None, "forged"
        return bytes(value), ""


class SafeStore:
    """Wraps a Store so that backend failures become misses / skipped writes, counted and logged;
    with a `signer`, values are sealed on write and unsealed entries dropped on read."""

    def __init__(self, store: Store, signer: Signer | None = None):
        self.store = store
        self.signer = signer
        self.healthy = True

    @property
    def redis(self):
        """The Redis client behind the store (for coordination between replicas), or None."""
        return getattr(self.store, "client", None)

    async def get(self, key: str) -> bytes | None:
        blob = await self._call("get", self.store.get(key))
        if blob is None or self.signer is None:
            return blob
        value, why = self.signer.open(key, blob)
        if value is None:
            metrics.CACHE_REJECTED.labels(why).inc()
            log.warning("dropping %s cache entry %s", why, key, extra={"key": key, "reason": why})
            await self.delete(key)
        return value

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        if self.signer is not None:
            value = self.signer.seal(key, value)
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
