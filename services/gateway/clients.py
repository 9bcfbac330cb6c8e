"""gRPC clients of the gateway's two hops, with retries declared once, in the channel's service
config: UNAVAILABLE is retried with exponential backoff (within the call's deadline), and the
channel reconnects quickly after a peer restarts, so no gateway restart is ever needed.
With several decoder replicas, each has its own client (`DecoderPool`) and fewer attempts: another
replica can take the request sooner than a dead one comes back."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import Counter, Gauge

from shared.errors import Unavailable, Upstream

from .routing import Router
from shared.transfer import chunks
from vlsplit.v1 import common_pb2, llm_decoder_pb2, llm_decoder_pb2_grpc, vision_encoder_pb2, vision_encoder_pb2_grpc

MAX_MESSAGE_BYTES = 64 << 20
PAYLOAD_BYTES_SENT = Counter("vlsplit_gateway_payload_bytes_sent",
                             "Embedding payload bytes sent to decoders (none when a decoder holds the image)")
Fetch = Callable[[], Awaitable[list[bytes]]]  # gets the request's image payloads when a decoder asks
ENCODER_REQUESTS = Counter("vlsplit_gateway_encoder_requests", "Encode calls sent, by encoder replica", ["replica"])
ENCODER_FAILOVERS = Counter("vlsplit_gateway_encoder_failovers", "Encoder calls moved to another encoder replica")
ENCODERS_SERVING = Gauge("vlsplit_gateway_encoders_serving", "Encoder replicas whose health says SERVING")
log = logging.getLogger("vlsplit.gateway")
FAILOVER_ATTEMPTS = 2  # per decoder replica when there are several: fail over after ~0.1 s of backoff


def channel_options(service: str, attempts: int) -> list[tuple[str, object]]:
    retry = {
        "maxAttempts": attempts,
        "initialBackoff": "0.1s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    config = {"methodConfig": [{"name": [{"service": service}], "retryPolicy": retry}]}
    return [
        ("grpc.service_config", json.dumps(config)),
        ("grpc.enable_retries", 1),
        # Streams are retried only while their requests fit the retry buffer: make payloads fit.
        ("grpc.per_rpc_retry_buffer_size", MAX_MESSAGE_BYTES),
        ("grpc.retry_buffer_size", MAX_MESSAGE_BYTES),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]


def upstream_error(peer: str, address: str, exc: grpc.aio.AioRpcError) -> Exception:
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"{peer} at {address} is unavailable after retries: {exc.details()}")
    return Upstream(code.name, f"{peer}: {exc.details()}")


@dataclass
class Encoded:
    payload: bytes
    info: common_pb2.EmbeddingInfo
    cache_hit: bool
    encode_ms: float


class _Client:
    peer = ""
    service = ""
    stub_class: type = object

    def __init__(self, address: str, attempts: int):
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=channel_options(self.service, attempts))
        self.stub = self.stub_class(self.channel)

    async def model_info(self, timeout: float) -> common_pb2.ModelInfo:
        return await self._unary(self.stub.GetModelInfo, common_pb2.ModelInfoRequest(), timeout)

    async def _unary(self, method, request, timeout: float):
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise upstream_error(self.peer, self.address, exc) from None

    async def close(self, grace: float | None = None) -> None:
        """Without `grace`, calls still running are cancelled."""
        await self.channel.close(grace)


class EncoderClient(_Client):
    peer, service, stub_class = "encoder", "vlsplit.v1.VisionEncoder", vision_encoder_pb2_grpc.VisionEncoderStub

    async def encode(self, request: vision_encoder_pb2.EncodeRequest, timeout: float) -> Encoded:
        parts, first = [], None
        try:
            async for reply in self.stub.Encode(request, timeout=timeout):
                if reply.WhichOneof("part") == "info":
                    first = reply
                else:
                    parts.append(reply.chunk)
        except grpc.aio.AioRpcError as exc:
            raise upstream_error(self.peer, self.address, exc) from None
        if first is None:
            raise Unavailable(f"encoder at {self.address} sent no payload")
        return Encoded(b"".join(parts), first.info, first.cache_hit, first.encode_ms)

    async def put_image(self, data: bytes, timeout: float) -> vision_encoder_pb2.PutImageResponse:
        return await self._unary(self.stub.PutImage, vision_encoder_pb2.PutImageRequest(image=data), timeout)


class EncoderPool:
    """Several encoder replicas (a list, or names re-resolved by a `Router`): each encode goes to the
    serving replica with the fewest requests in flight (ties: the image's rendezvous order, so
    concurrent misses for one image tend to meet on one replica); a replica that is unreachable, or
    dies mid-encode, is marked down and the request moves to the next within its deadline; a replica
    whose health says NOT_SERVING (draining, or not yet loaded) gets no new work."""

    def __init__(self, router: Router, attempts: int, close_grace_s: float):
        self.router, self.close_grace_s = router, close_grace_s
        self.attempts = attempts
        self._clients: dict[str, EncoderClient] = {}
        self._watches: dict[str, asyncio.Task] = {}
        self._serving: dict[str, bool] = {}
        self.outstanding: dict[str, int] = {}
        self._closing: set[asyncio.Task] = set()

    def get(self, address: str) -> EncoderClient:
        client = self._clients.get(address)
        if client is None:
            attempts = self.attempts if len(self.router.replicas) <= 1 else min(self.attempts, FAILOVER_ATTEMPTS)
            client = self._clients[address] = EncoderClient(address, attempts)
            self._watches[address] = asyncio.ensure_future(self._watch_health(address, client))
        return client

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

    async def _first(self, call: Callable[[str, EncoderClient], Awaitable], image_id: str = ""):
        """`call` on the replicas in order until one answers; an unreachable one is marked down and
        the call moves to the next (the last one's error is raised)."""
        order = self.order(image_id)
        for i, replica in enumerate(order):
            try:
                result = await call(replica, self.get(replica))
            except Unavailable as exc:
                if i == len(order) - 1:
                    raise
                self.router.mark_down(replica)
                ENCODER_FAILOVERS.inc()
                log.warning("encoder %s unavailable (%s); trying %s", replica, exc, order[i + 1])
                continue
            self.router.mark_up(replica)
            return result
        raise Unavailable("no encoder replica")  # unreachable: the loop returns or raises

    async def model_info(self, timeout: float) -> common_pb2.ModelInfo:
        return await self._first(lambda _, client: client.model_info(timeout))

    async def put_image(self, data: bytes, timeout: float) -> vision_encoder_pb2.PutImageResponse:
        return await self._first(lambda _, client: client.put_image(data, timeout))

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

    async def retain(self, addresses: list[str]) -> None:
        """Clients (and health watches) for `addresses`; those of replicas that left are closed
        once their running calls end (or after the grace)."""
        for address in addresses:
            self.get(address)
        for address in [a for a in self._clients if a not in addresses]:
            self._watches.pop(address).cancel()
            self._serving.pop(address, None)
            task = asyncio.create_task(self._clients.pop(address).close(self.close_grace_s))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for task in self._watches.values():
            task.cancel()
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(client.close() for client in clients), *self._closing)


class DecoderClient(_Client):
    peer, service, stub_class = "decoder", "vlsplit.v1.LLMDecoder", llm_decoder_pb2_grpc.LLMDecoderStub

    async def negotiate(self, rpc: str, header: llm_decoder_pb2.GenerateHeader, fetch: Fetch, timeout: float,
                        ) -> AsyncIterator:
        """Call Generate or Classify with the header's image_ids and no payload; only if the decoder
        replies `need_payload` (it does not hold the images' prefix) are the payloads fetched and sent."""
        call = getattr(self.stub, rpc)(timeout=timeout)
        writing = True
        try:
            await call.write(llm_decoder_pb2.GenerateRequest(header=header))
            while (reply := await call.read()) is not grpc.aio.EOF:
                if reply.need_payload:
                    payloads = await fetch()
                    try:
                        await _send_payloads(call, payloads)
                    except asyncio.InvalidStateError:  # the decoder ended the call meanwhile: say why
                        raise upstream_error("decoder", self.address, await _ended(call)) from None
                    writing = False
                    continue
                if writing:
                    await call.done_writing()
                    writing = False
                yield reply
        except grpc.aio.AioRpcError as exc:
            raise upstream_error("decoder", self.address, exc) from None
        finally:
            call.cancel()  # no-op when finished; stops the decoder when our client went away


async def _ended(call) -> grpc.aio.AioRpcError:
    """The error a finished call ended with."""
    return grpc.aio.AioRpcError(await call.code(), await call.initial_metadata(), await call.trailing_metadata(),
                                await call.details())


async def _send_payloads(call, payloads: list[bytes]) -> None:
    await call.write(llm_decoder_pb2.GenerateRequest(
        payload_sizes=llm_decoder_pb2.PayloadSizes(payload_bytes=[len(p) for p in payloads])))
    for payload in payloads:
        for chunk in chunks(payload):
            await call.write(llm_decoder_pb2.GenerateRequest(payload_chunk=chunk))
    await call.done_writing()
    PAYLOAD_BYTES_SENT.inc(sum(len(p) for p in payloads))


class DecoderPool:
    """One `DecoderClient` per decoder replica address, made on first use. A channel's retry attempts
    are fixed when it is made: `attempts` while there is one replica, else at most FAILOVER_ATTEMPTS."""

    def __init__(self, attempts: int, replicas: int, close_grace_s: float):
        self.attempts, self.close_grace_s = attempts, close_grace_s
        self._replicas = replicas
        self._clients: dict[str, DecoderClient] = {}
        self._closing: set[asyncio.Task] = set()

    def get(self, address: str) -> DecoderClient:
        client = self._clients.get(address)
        if client is None:
            attempts = self.attempts if self._replicas <= 1 else min(self.attempts, FAILOVER_ATTEMPTS)
            client = self._clients[address] = DecoderClient(address, attempts)
        return client

    async def retain(self, addresses: list[str]) -> None:
        """Keep the clients of `addresses`; close the others once their running calls end (or after
        the grace), in the background, so a replica leaving DNS does not cut its answers short."""
        self._replicas = len(addresses)
        for address in [a for a in self._clients if a not in addresses]:
            task = asyncio.create_task(self._clients.pop(address).close(self.close_grace_s))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(client.close() for client in clients), *self._closing)


