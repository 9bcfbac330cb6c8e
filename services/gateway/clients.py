"""gRPC clients of the gateway's two hops, one per replica, with retries declared once, in the
channel's service config: UNAVAILABLE is retried with exponential backoff (within the call's
deadline), and the channel reconnects quickly after a peer restarts, so no gateway restart is ever
needed. The pools of these clients, one per tier, are in pools.py."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

import grpc
from prometheus_client import Counter

from shared.errors import Unavailable, Upstream
from shared.tls import ClientTls, secure_channel
from shared.transfer import chunks
from vlsplit.v1 import common_pb2, llm_decoder_pb2, llm_decoder_pb2_grpc, vision_encoder_pb2, vision_encoder_pb2_grpc

MAX_MESSAGE_BYTES = 96 << 20  # a 64 MiB clip (VLSPLIT_MAX_VIDEO_BYTES) and its envelope, with room
PAYLOAD_BYTES_SENT = Counter("vlsplit_gateway_payload_bytes_sent",
                             "Embedding payload bytes sent to decoders (none when a decoder holds the image)")
Fetch = Callable[[], Awaitable[list[bytes]]]  # gets the request's image payloads when a decoder asks


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


class ReplicaClient:
    """One replica's channel and stub, with the calls both tiers answer."""

    peer = ""
    service = ""
    stub_class: type = object

    def __init__(self, address: str, attempts: int, tls: ClientTls | None = None, name: str = ""):
        self.address = address
        self.channel = secure_channel(address, tls, channel_options(self.service, attempts), name)
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


class EncoderClient(ReplicaClient):
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

    async def put_image(self, data: bytes, scope: str, timeout: float, video: bool = False,
                        ) -> vision_encoder_pb2.PutImageResponse:
        return await self._unary(self.stub.PutImage,
                                 vision_encoder_pb2.PutImageRequest(image=data, scope=scope, video=video), timeout)


class DecoderClient(ReplicaClient):
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
