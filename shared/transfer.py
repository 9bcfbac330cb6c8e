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
    """Reassembles a sequence of payloads of announced sizes from chunks."""

    def __init__(self, sizes: list[int], limit: int):
        if any(s <= 0 for s in sizes):
            raise InvalidRequest("payload sizes must be positive")
        if sum(sizes) > limit:
            raise TooLarge(f"payloads total {sum(sizes)} bytes; the limit is {limit} bytes")
        self.sizes = list(sizes)
        self.buffer = bytearray()

    def add(self, chunk: bytes) -> None:
        if len(self.buffer) + len(chunk) > sum(self.sizes):
            raise InvalidRequest(f"more payload bytes than the announced {sum(self.sizes)}")
        self.buffer += chunk

    @property
    def complete(self) -> bool:
        return len(self.buffer) == sum(self.sizes)

    def payloads(self) -> list[bytes]:
        if not self.complete:
            raise InvalidRequest(f"got {len(self.buffer)} payload bytes, announced {sum(self.sizes)}")
        out, start = [], 0
        for size in self.sizes:
            out.append(bytes(self.buffer[start:start + size]))
            start += size
        return out
