"""Per-client request rates: a token bucket per client (`requests_per_s` sustained, bursts of up to one
second's worth), kept in this process (VLSPLIT_AUTH_RATE_SCOPE=replica) or in Redis, shared by every
gateway replica (cluster): N gateways then admit a client's rate in total, not N times it.

The Redis bucket is one small hash per client updated by a Lua script on Redis' clock (every replica
reads the same time; the key's hash tag keeps it on one Redis Cluster slot). When Redis fails, this
replica's own bucket decides: the client keeps a limit (its rate per replica, as with scope replica) and
the gateway keeps serving; each such check is counted and the switch is logged, both ways.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import Counter
from redis.exceptions import RedisError

log = logging.getLogger("vlsplit.auth")

SCOPES = ("replica", "cluster")
FALLBACKS = Counter("vlsplit_gateway_rate_limit_fallbacks",
                    "Rate checks this replica made alone because Redis failed (VLSPLIT_AUTH_RATE_SCOPE=cluster)")

# KEYS[1]: the client's bucket; ARGV: rate per second, capacity. Returns the wait in seconds as text
# (a Lua number would reach the client truncated to an integer); "0" = one request taken.
BUCKET = """
local rate, capacity = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = math.min(capacity, (tonumber(state[1]) or capacity) + math.max(0, now - (tonumber(state[2]) or now)) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
return tostring(wait)
"""


def capacity(requests_per_s: float) -> float:
    return max(1.0, requests_per_s)


class RateLimiter:
    """The bucket in this process."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, last refill)

    def wait_s(self, client) -> float:
        """0 and one request taken, or how long until the next one is allowed."""
        if client.requests_per_s <= 0:
            return 0.0
        full = capacity(client.requests_per_s)
        now = self.clock()
        tokens, last = self._buckets.get(client.name, (full, now))
        tokens = min(full, tokens + (now - last) * client.requests_per_s)
        if tokens >= 1:
            self._buckets[client.name] = (tokens - 1, now)
            return 0.0
        self._buckets[client.name] = (tokens, now)
        return (1 - tokens) / client.requests_per_s

    async def take(self, client) -> float:
        return self.wait_s(client)


class ClusterRateLimiter:
    """The bucket in Redis (`attach` it once the event loop runs), this replica's own when Redis fails."""

    def __init__(self, timeout_s: float, local: RateLimiter | None = None):
        self.timeout_s, self.local = timeout_s, local or RateLimiter()
        self._script = None
        self._degraded = False

    def attach(self, redis) -> None:
        self._script = redis.register_script(BUCKET)

    async def take(self, client) -> float:
        if client.requests_per_s <= 0:
            return 0.0
        try:
            if self._script is None:
                raise RedisError("no Redis client attached")
            wait = await asyncio.wait_for(self._script(keys=[f"vlsplit:rate:{{{client.name}}}"],
                                                       args=[repr(client.requests_per_s),
                                                             repr(capacity(client.requests_per_s))]),
                                          self.timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            FALLBACKS.inc()
            if not self._degraded:
                self._degraded = True
                log.warning("the shared rate limiter's Redis failed (%s: %s); each gateway replica limits clients "
                            "alone until it answers (a client may get its rate once per replica)",
                            type(exc).__name__, exc)
            return self.local.wait_s(client)
        if self._degraded:
            self._degraded = False
            log.warning("the shared rate limiter's Redis answers again; rates are cluster-wide again")
        return float(wait)


def limiter_for(scope: str, timeout_s: float) -> RateLimiter | ClusterRateLimiter:
    if scope not in SCOPES:
        raise ValueError(f"VLSPLIT_AUTH_RATE_SCOPE={scope!r}: expected replica or cluster")
    return ClusterRateLimiter(timeout_s) if scope == "cluster" else RateLimiter()
