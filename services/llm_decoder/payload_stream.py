"""The client side of a Generate/Classify call as the decoder reads it: a header, maybe payload
sizes, then payload chunks. The header and each chunk are awaited for at most `idle_s` (a stream
that goes quiet is dropped); the sizes after `need_payload` for at most `wait_s`, since the client
may have to run the vision tower first (it holds nothing meanwhile). The bytes a call announces are
reserved from one budget for all calls."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Callable

from shared.errors import DeadlineExceeded, InvalidRequest, Overloaded
from shared.transfer import Assembler
from vlsplit.v1 import llm_decoder_pb2

from .metrics import IDLE_STREAMS, RESERVED_BYTES



class PayloadBudget:
    """Payload bytes that calls in progress may hold together (received or announced)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def reserve(self, n: int) -> int:
        if self.used + n > self.limit:
            raise Overloaded(f"the decoder holds {self.used} payload bytes for calls in progress; {n} more would "
                             f"pass the limit of {self.limit} (VLSPLIT_MAX_RECEIVING_BYTES); retry with backoff")
        self.used += n
        RESERVED_BYTES.set(self.used)
        return n

    def release(self, n: int) -> None:
        self.used -= n
        RESERVED_BYTES.set(self.used)


class RequestStream:
    def __init__(self, messages: AsyncIterator[llm_decoder_pb2.GenerateRequest], idle_s: float, wait_s: float):
        self.messages, self.idle_s, self.wait_s = messages, idle_s, wait_s
        self.last_message_at = time.perf_counter()

    async def next(self, what: str, setting: str = "VLSPLIT_STREAM_IDLE_S",
                   timeout: float | None = None) -> llm_decoder_pb2.GenerateRequest | None:
        if timeout is None:
            timeout = self.wait_s if setting == "VLSPLIT_PAYLOAD_WAIT_S" else self.idle_s
        try:
            message = await asyncio.wait_for(anext(self.messages, None), timeout)
        except asyncio.TimeoutError:
            IDLE_STREAMS.inc()
            limit = self.wait_s if setting == "VLSPLIT_PAYLOAD_WAIT_S" else self.idle_s
            raise DeadlineExceeded(f"no {what} for {limit:g} s ({setting}); the call is dropped") from None
        self.last_message_at = time.perf_counter()
        return message

    async def header(self) -> llm_decoder_pb2.GenerateHeader:
        message = await self.next("header")
        if message is None or message.WhichOneof("part") != "header":
            raise InvalidRequest("the first Generate message must be the header")
        return message.header

    async def sizes(self, images: int) -> list[int]:
        message = await self.next("payload sizes", "VLSPLIT_PAYLOAD_WAIT_S")
        if message is None or message.WhichOneof("part") != "payload_sizes":
            raise InvalidRequest("after need_payload, the next message must be payload_sizes")
        sizes = list(message.payload_sizes.payload_bytes)
        if len(sizes) != images:
            raise InvalidRequest(f"the messages hold {images} images but payload_sizes lists {len(sizes)} payloads")
        return sizes

    async def payloads(self, assembler: Assembler) -> list[memoryview]:
        """The announced bytes; `idle_s` is the longest wait for the next byte (empty chunks do not count)."""
        progress = time.perf_counter()
        while not assembler.complete:
            left = max(0.0, progress + self.idle_s - time.perf_counter())
            if (message := await self.next("payload bytes", timeout=left)) is None:
                break
            if message.WhichOneof("part") != "payload_chunk":
                raise InvalidRequest("after the header, only payload_chunk messages may follow")
            if message.payload_chunk:
                assembler.add(message.payload_chunk)
                progress = time.perf_counter()
        return assembler.payloads()  # InvalidRequest if the stream ended short

    async def expect_end(self, fail: Callable[[BaseException], None]) -> None:
        """The call's request is complete: anything the client sends now is an error."""
        if await anext(self.messages, None) is not None:
            fail(InvalidRequest("more payload bytes (or messages) than the header announced"))
