"""The gateway's replica pools: one client per encoder or decoder replica, made on first use, closed
once its replica leaves (after its running calls end, or the grace). A channel's retry attempts are
fixed when it is made: `attempts` while its tier has one replica, else at most FAILOVER_ATTEMPTS, so
another replica takes the request sooner than a dead one comes back.

Decoders are chosen by image (routing.py: rendezvous order, so a replica keeps the image's KV);
encoders by load: the serving replica with the fewest requests in flight."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import Counter, Gauge

from shared.errors import Unavailable, Upstream
from shared.metrics import BoundedLabel
from shared.tls import ClientTls
from vlsplit.v1 import common_pb2, vision_encoder_pb2

from .clients import DecoderClient, Encoded, EncoderClient, ReplicaClient
from .routing import Router, failover_reason

FAILOVER_ATTEMPTS = 2  # per replica when its tier has several: fail over after ~0.1 s of backoff
ENCODER_REQUESTS = BoundedLabel(Counter("vlsplit_gateway_encoder_requests", "Encode calls sent, by encoder replica",
                                        ["replica"]))  # as DECODER_REQUESTS: bounded, departed replicas retired
ENCODER_FAILOVERS = Counter("vlsplit_gateway_encoder_failovers", "Encoder calls moved to another encoder replica")
ENCODERS_SERVING = Gauge("vlsplit_gateway_encoders_serving", "Encoder replicas whose health says SERVING")

C = TypeVar("C", bound=ReplicaClient)


class _Pool(Generic[C]):
    client_class: type

    def __init__(self, router: Router, attempts: int, close_grace_s: float, tls: ClientTls | None = None):
        self.router, self.attempts, self.close_grace_s = router, attempts, close_grace_s
        self.tls = tls
        self._clients: dict[str, C] = {}
        self._closing: set[asyncio.Task] = set()

    def replica_count(self) -> int:
        return len(self.router.replicas)

    def get(self, address: str) -> C:
        if self.tls is not None and self.tls.changed():  # rotated certificates: new channels from now on
            for old in list(self._clients):
                self._retire(old)
        client = self._clients.get(address)
        if client is None:
            attempts = self.attempts if self.replica_count() <= 1 else min(self.attempts, FAILOVER_ATTEMPTS)
            client = self.client_class(address, attempts, self.tls, self.router.name_of(address))
            self._clients[address] = client
            self._opened(address, client)
        return client

    async def retain(self, addresses: list[str]) -> None:
        """Keep the clients of `addresses`; close the others once their running calls end (or after
        the grace), in the background, so a replica leaving DNS does not cut its answers short."""
        for address in [a for a in self._clients if a not in addresses]:
            self._retire(address)

    def _retire(self, address: str) -> None:
        self._left(address)
        task = asyncio.create_task(self._clients.pop(address).close(self.close_grace_s))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for address in list(self._clients):
            self._left(address)
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(client.close() for client in clients), *self._closing)

    def _opened(self, address: str, client: C) -> None:
        """A client for `address` was made."""

    def _left(self, address: str) -> None:
        """`address` left the pool (its client is being closed)."""


class DecoderPool(_Pool[DecoderClient]):
    """Decoder clients; the pipeline picks the replica for each image from the same Router."""

    client_class = DecoderClient


class EncoderPool(_Pool[EncoderClient]):
    """Several encoder replicas (a list, or names re-resolved by a `Router`): each encode goes to the
    serving replica with the fewest requests in flight (ties: the image's rendezvous order, so
    concurrent misses for one image tend to meet on one replica); a replica that is unreachable, or
    dies mid-encode, is marked down and the request moves to the next within its deadline; a replica
    whose health says NOT_SERVING (draining, or not yet loaded) gets no new work."""

    client_class = EncoderClient

    def __init__(self, router: Router, attempts: int, close_grace_s: float, tls: ClientTls | None = None):
        super().__init__(router, attempts, close_grace_s, tls)
        self._watches: dict[str, asyncio.Task] = {}
        self._serving: dict[str, bool] = {}
        self.outstanding: dict[str, int] = {}

    def order(self, image_id: str) -> list[str]:
        """Replicas to try: serving and up first, by fewest in flight, then the rest."""
        ranked = self.router.order(image_id)
        for replica in ranked:
            self.get(replica)
        rank = {replica: i for i, replica in enumerate(ranked)}
        return sorted(ranked, key=lambda r: (self.router.is_down(r), not self._serving.get(r, True),
                                             self.outstanding.get(r, 0), rank[r]))

    async def encode(self, request: vision_encoder_pb2.EncodeRequest, image_id: str, timeout: float) -> Encoded:
        deadline = asyncio.get_running_loop().time() + timeout

        async def on(replica: str, client: EncoderClient) -> Encoded:
            self.outstanding[replica] = self.outstanding.get(replica, 0) + 1
            ENCODER_REQUESTS.labels(replica).inc()
            try:
                return await client.encode(request, max(0.001, deadline - asyncio.get_running_loop().time()))
            finally:
                self.outstanding[replica] -= 1

        return await self._first(on, image_id)

    async def model_info(self, timeout: float) -> common_pb2.ModelInfo:
        return await self._first(lambda _, client: client.model_info(timeout))

    async def put_image(self, data: bytes, scope: str, timeout: float, video: bool = False,
                        ) -> vision_encoder_pb2.PutImageResponse:
        return await self._first(lambda _, client: client.put_image(data, scope, timeout, video))

    async def retain(self, addresses: list[str]) -> None:
        """Clients and health watches for `addresses` from now on (not at first use)."""
        for address in addresses:
            self.get(address)
        await super().retain(addresses)

    async def _first(self, call: Callable[[str, EncoderClient], Awaitable], image_id: str = ""):
        """`call` on the replicas in order until one answers; an unreachable one is marked down and
        the call moves to the next, as does one whose queue is full (the last one's error is raised)."""
        order = self.order(image_id)
        for i, replica in enumerate(order):
            try:
                result = await call(replica, self.get(replica))
            except (Unavailable, Upstream) as exc:
                reason = failover_reason(exc, order, i)
                ENCODER_FAILOVERS.inc()
                self.router.moved(replica, order[i + 1], reason, exc)
                continue
            self.router.mark_up(replica)
            return result
        raise Unavailable("no encoder replica")  # unreachable: the loop returns or raises

    def _opened(self, address: str, client: EncoderClient) -> None:
        self._watches[address] = asyncio.ensure_future(self._watch_health(address, client))

    def _left(self, address: str) -> None:
        self._watches.pop(address).cancel()
        self._serving.pop(address, None)
        ENCODERS_SERVING.set(sum(self._serving.values()))

    async def _watch_health(self, address: str, client: EncoderClient) -> None:
        """Follow the replica's health (streamed): NOT_SERVING takes it out of the rotation."""
        stub = health_pb2_grpc.HealthStub(client.channel)
        while True:
            try:
                async for reply in stub.Watch(health_pb2.HealthCheckRequest(), wait_for_ready=True):
                    self._serving[address] = reply.status == health_pb2.HealthCheckResponse.SERVING
                    ENCODERS_SERVING.set(sum(self._serving.values()))
            except grpc.aio.AioRpcError:
                self._serving.pop(address, None)  # unreachable: unknown, the failover handles it
                ENCODERS_SERVING.set(sum(self._serving.values()))
            await asyncio.sleep(1.0)  # reconnect pacing after the stream ended
