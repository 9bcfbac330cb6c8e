"""Moving payload bytes over gRPC in chunks, so no message exceeds the default 4 MiB limit."""

from __future__ import annotations

from typing import Iterator

from .errors import InvalidRequest, TooLarge

CHUNK_BYTES = 1 << 20


def chunks(data: bytes, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(view), size):
        yield bytes(view[start:start + size])


class Assembler:
    """Reassembles a sequence of payloads of announced sizes from chunks, into one buffer."""

    def __init__(self, sizes: list[int], limit: int):
        self.check(sizes, limit)
        self.sizes = list(sizes)
        self.total = sum(sizes)
        self.buffer = bytearray(self.total)  # allocated once: chunks are copied in place
        self.filled = 0

    @staticmethod
    def check(sizes: list[int], limit: int) -> None:
        """Refuse announced sizes before anything is allocated for them."""
        if any(s <= 0 for s in sizes):
            raise InvalidRequest("payload sizes must be positive")
        if sum(sizes) > limit:
            raise TooLarge(f"payloads total {sum(sizes)} bytes; the limit is {limit} bytes")

    def add(self, chunk: bytes) -> None:
        if self.filled + len(chunk) > self.total:
            raise InvalidRequest(f"more payload bytes than the announced {self.total}")
        self.buffer[self.filled:self.filled + len(chunk)] = chunk
        self.filled += len(chunk)

    @property
    def complete(self) -> bool:
        return self.filled == self.total

    def payloads(self) -> list[memoryview]:
        """Each payload's bytes, as views of the buffer (no copy)."""
        if not self.complete:
            raise InvalidRequest(f"got {self.filled} payload bytes, announced {self.total}")
        out, start, view = [], 0, memoryview(self.buffer)
        for size in self.sizes:
            out.append(view[start:start + size])
            start += size
        return out
