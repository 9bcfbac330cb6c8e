"""Image-affinity routing over decoder replicas.

Every question about one image goes to the same replica, so that replica can keep the image's
prefix warm: rendezvous (highest-random-weight) hashing ranks the replicas per image_id with a
stable hash. Adding or removing a replica moves only the images whose first choice it is. A replica
that failed is ranked last for `down_s`, and requests move down the ranking (failover).

Replicas come from `GatewayConfig.decoder`: comma-separated `host:port` entries; an entry whose
host is a name (optionally written `dns:///name:port`) resolving to several addresses is one
replica per address, re-resolved in the background. No grpc here: plain data, tested alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable

from prometheus_client import Counter

from shared.errors import Unavailable, Upstream
from shared.metrics import BoundedLabel

log = logging.getLogger("vlsplit.gateway.routing")

FAILOVERS = Counter("vlsplit_gateway_failovers_total",
                    "Decoder requests moved to the next replica before any token was sent, by reason",
                    ["reason"])  # unavailable | overloaded
MIGRATIONS = Counter("vlsplit_gateway_migrations_total",
                     "Answers resumed on another decoder after theirs died mid-answer")
# By replica: the first VLSPLIT_METRICS_LABEL_LIMIT addresses, the rest as "other"; a replica gone from
# DNS frees its slot (Router.refresh), so pod churn does not end in "other" either.
DECODER_REQUESTS = BoundedLabel(Counter("vlsplit_gateway_decoder_requests_total",
                                        "Generate calls sent, by decoder replica", ["replica"]))

Resolve = Callable[[str, int], Awaitable[list[str]]]  # (host, port) -> IP addresses


@dataclass(frozen=True)
class Target:
    """One configured `host:port` entry."""

    text: str  # as configured, without "dns:///": the channel target when it stands for one replica
    host: str
    port: int

    @property
    def literal(self) -> bool:
        """An IP address: nothing to resolve."""
        try:
            ipaddress.ip_address(self.host)
            return True
        except ValueError:
            return False


def parse_targets(spec: str, what: str = "decoder") -> list[Target]:
    """`a:1,b:2`, `dns:///name:port`, `[::1]:50053` -> targets; ValueError says what is wrong."""
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise ValueError(f"{what}: at least one host:port is required")
    return [_target(item, what) for item in items]


def _target(item: str, what: str) -> Target:
    text = item.removeprefix("dns:///")
    host, sep, port = text.rpartition(":")
    if "/" in text or not sep or not host or not port.isdigit():
        raise ValueError(f"{what} {item!r}: expected host:port or dns:///name:port")
    return Target(text, host.strip("[]"), int(port))


def rendezvous(image_id: str, replicas: Iterable[str]) -> list[str]:
    """Replicas by preference for `image_id`: highest blake2b(replica|image_id) first."""
    return sorted(set(replicas), key=lambda replica: (_weight(replica, image_id), replica), reverse=True)


def _weight(replica: str, image_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{replica}|{image_id}".encode(), digest_size=8).digest(), "big")


async def resolve_addresses(host: str, port: int) -> list[str]:
    """The name's addresses of one family: IPv4 if it has any, else IPv6. A dual-stack host (say
    localhost, or a dual-stack pod) has one of each, and it is one replica, not two."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    by_family = {family: sorted({info[4][0] for info in infos if info[0] == family})
                 for family in (socket.AF_INET, socket.AF_INET6)}
    return by_family[socket.AF_INET] or by_family[socket.AF_INET6]


def failover_reason(exc: Exception, order: list[str], i: int) -> str:
    """Why the call that failed with `exc` on replica order[i] may move on to order[i + 1]: "unavailable"
    (gone) or "overloaded" (its queue is full). Re-raises `exc` when it may not: not a replica's failure
    (a client's error), or no replica is left."""
    if isinstance(exc, Unavailable) and i < len(order) - 1:
        return "unavailable"
    if isinstance(exc, Upstream) and exc.grpc_code == "RESOURCE_EXHAUSTED" and i < len(order) - 1:
        return "overloaded"
    raise exc


class Router:
    def __init__(self, spec: str, down_s: float, resolve: Resolve = resolve_addresses,
                 clock: Callable[[], float] = time.monotonic, what: str = "decoder",
                 metric: BoundedLabel | None = None):
        """`metric`: the per-replica metric whose series of a departed replica are retired."""
        self.what, self.metric = what, metric
        self.targets = parse_targets(spec, what)
        self.down_s = down_s
        self._resolve, self._clock = resolve, clock
        # until the first resolution (or if it never succeeds) a name is one replica: gRPC resolves it
        self._by_target = {target: [target.text] for target in self.targets}
        self.replicas = self._collect()
        self._down_until: dict[str, float] = {}

    def moved(self, replica: str, to: str, reason: str, exc: Exception) -> None:
        """A call leaves `replica` for `to` (failover_reason's `reason`): a gone replica is tried last
        for a while (down_s); a full one stays first (it answers at once)."""
        if reason == "unavailable":
            self.mark_down(replica)
        log.warning("%s %s %s (%s); trying %s", self.what, replica, reason, exc, to)

    @property
    def dynamic(self) -> bool:
        """Some entry is a name, so the replica set may change."""
        return not all(target.literal for target in self.targets)

    def order(self, image_id: str) -> list[str]:
        """All replicas by preference for `image_id`; those marked down come last, still in order."""
        ranked = rendezvous(image_id, self.replicas)
        now = self._clock()
        up = [replica for replica in ranked if self._down_until.get(replica, 0.0) <= now]
        return up + [replica for replica in ranked if replica not in up]

    def name_of(self, replica: str) -> str:
        """The host name `replica` was configured or resolved as (what its TLS certificate names)."""
        for target, replicas in self._by_target.items():
            if replica in replicas:
                return target.host
        return replica.rpartition(":")[0].strip("[]")

    def is_down(self, replica: str) -> bool:
        return self._down_until.get(replica, 0.0) > self._clock()

    def mark_down(self, replica: str) -> None:
        self._down_until[replica] = self._clock() + self.down_s

    def mark_up(self, replica: str) -> None:
        self._down_until.pop(replica, None)

    async def refresh(self) -> bool:
        """Resolve the names again; True when the replica set changed. A failed or empty
        resolution keeps the name's last replicas (a DNS hiccup never empties the set)."""
        for target in self.targets:
            if target.literal:
                continue
            try:
                addresses = await self._resolve(target.host, target.port)
            except (OSError, UnicodeError) as exc:  # gaierror is an OSError; a bad IDNA name a UnicodeError
                log.warning("cannot resolve %s %s (%s); keeping %s", self.what, target.text, exc, self._by_target[target])
                continue
            if addresses:
                self._by_target[target] = _replicas(target, addresses)
        replicas = self._collect()
        if replicas == self.replicas:
            return False
        log.info("%s replicas changed", self.what, extra={"before": self.replicas, "after": replicas})
        if self.metric is not None:
            for gone in set(self.replicas) - set(replicas):
                self.metric.retire(gone)
        self.replicas = replicas
        self._down_until = {r: t for r, t in self._down_until.items() if r in replicas}
        return True

    async def watch(self, every_s: float, on_change: Callable[[list[str]], Awaitable[None]]) -> None:
        """Background task: re-resolve every `every_s` seconds, forever."""
        while True:
            await asyncio.sleep(every_s)
            if await self.refresh():
                await on_change(self.replicas)

    def _collect(self) -> list[str]:
        return sorted({replica for replicas in self._by_target.values() for replica in replicas})


def _replicas(target: Target, addresses: list[str]) -> list[str]:
    """One address: the name itself stays the channel target (as with a single decoder before)."""
    if len(addresses) == 1:
        return [target.text]
    return [f"[{a}]:{target.port}" if ":" in a else f"{a}:{target.port}" for a in addresses]
