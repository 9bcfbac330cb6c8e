"""gRPC clients of the gateway's two hops, with retries declared once, in the channel's service
config: UNAVAILABLE is retried with exponential backoff (within the call's deadline), and the
channel reconnects quickly after a peer restarts, so no gateway restart is ever needed.
With several decoder replicas, each has its own client (`DecoderPool`) and fewer attempts: another
replica can take the request sooner than a dead one comes back."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

import grpc
from prometheus_client import Counter

from vlsplit.shared.errors import Unavailable, Upstream
from vlsplit.shared.transfer import chunks
from vlsplit.v1 import common_pb2, llm_decoder_pb2, llm_decoder_pb2_grpc, vision_encoder_pb2, vision_encoder_pb2_grpc

MAX_MESSAGE_BYTES = 64 << 20
PAYLOAD_BYTES_SENT = Counter("vlsplit_gateway_payload_bytes_sent",
                             "Embedding payload bytes sent to decoders (none when a decoder holds the image)")
Fetch = Callable[[], Awaitable[list[bytes]]]  # gets the request's image payloads when a decoder asks
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


