"""Cross-replica single flight: N encoder replicas asked for one new image at once encode it once.

    run(key, compute, cached):
        take the lock `vlsplit:lock:<key>` (Redis SET NX PX via redis-py's Lock, random token)
          got it  -> compute (kept alive: the lock's expiry is renewed every lock_s / 3 while the
                     tower runs) -> PUBLISH `vlsplit:done:<key>` -> release (only our own token)
          taken   -> SUBSCRIBE to the done channel, look in the cache (the holder may have finished
                     before we subscribed), wait for the message or for the lock's expiry, look
                     again; still nothing (the holder died, or its result could not be cached) ->
                     try to take the lock: one survivor takes over

In-process concurrency is handled before this (`singleflight.py`): one replica asks here once per
image, whatever its number of callers. Without Redis (the in-process `memory` store) or when Redis
fails, there is nothing to coordinate with: the replica computes by itself, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Awaitable, Callable, TypeVar

from prometheus_client import Counter, Gauge
from redis.asyncio import Redis
from redis.exceptions import LockError, RedisError

log = logging.getLogger("vlsplit.encoder")

T = TypeVar("T")

HELD = Gauge("vlsplit_encoder_replica_locks_held", "Images this replica is encoding under the cross-replica lock")
WAITS = Counter("vlsplit_encoder_replica_waits", "Encodes that waited for another replica instead of computing",
                ["outcome"])


class ReplicaFlight:
    def __init__(self, client: Redis | None, lock_s: float):
        self.client = client if lock_s > 0 else None
        self.lock_s = lock_s

    async def run(self, key: str, compute: Callable[[], Awaitable[T]], cached: Callable[[], Awaitable[T | None]]) -> T:
        if self.client is None:
            return await compute()
        lock = self.client.lock(f"vlsplit:lock:{key}", timeout=self.lock_s, blocking=False)
        channel = f"vlsplit:done:{key}"
        while True:
            try:
                acquired = await lock.acquire()
            except RedisError as exc:
                log.warning("replica lock unavailable (%s); encoding without coordination", exc)
                return await compute()
            if acquired:
                return await self._compute_holding(lock, channel, compute)
            result = await self._wait_for_holder(lock.name, channel, cached)
            if result is not None:
                WAITS.labels("shared").inc()
                return result
            WAITS.labels("took_over").inc()  # the holder went away without a result: try to take over

    async def _compute_holding(self, lock, channel: str, compute: Callable[[], Awaitable[T]]) -> T:
        HELD.inc()
        keepalive = asyncio.ensure_future(self._keep_alive(lock))
        try:
            return await compute()
        finally:
            keepalive.cancel()
            HELD.dec()
            with contextlib.suppress(RedisError, LockError):
                await self.client.publish(channel, b"1")  # waiters look in the cache now
                await lock.release()

    async def _keep_alive(self, lock) -> None:
        while True:
            await asyncio.sleep(self.lock_s / 3)  # a timer, not synchronisation: renew before expiry
            with contextlib.suppress(RedisError, LockError):
                await lock.reacquire()

    async def _wait_for_holder(self, lock_name: str, channel: str, cached: Callable[[], Awaitable[T | None]]) -> T | None:
        """The holder's result from the cache once it announces it, or None when its lock expired
        (or vanished) without one."""
        pubsub = self.client.pubsub()
        try:
            await pubsub.subscribe(channel)
            while True:
                result = await cached()
                if result is not None:
                    return result
                ttl_ms = await self.client.pttl(lock_name)
                if ttl_ms < 0:  # released or expired: the holder is gone
                    return await cached()
                deadline = time.monotonic() + ttl_ms / 1000 + 0.05
                while (remaining := deadline - time.monotonic()) > 0:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=remaining)
                    if message is not None:
                        break
        except RedisError as exc:
            log.warning("replica lock wait failed (%s); encoding without coordination", exc)
            return None
        finally:
            with contextlib.suppress(RedisError):
                await pubsub.aclose()
