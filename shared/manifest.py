"""The parts manifest of a cache value stored in parts (shared/cache.py).

    <key>                   PREFIX + seal(manifest JSON)   {"nonce", "total", "parts": [[length, sha256], ...]}
    <key>:part:<nonce>:<i>  the value's bytes i

With the cache's HMAC key the manifest is sealed (shared/cache.py Signer, bound to `<key>:parts`): its
part count, each part's length and digest and the total are what the writer wrote. A reader checks, in
this order and before it reads any part: the format, the manifest's size, its MAC, its shape and the
bound on parts (what the largest entry needs: VLSPLIT_CACHE_MAX_ENTRY_BYTES / VLSPLIT_CACHE_PART_BYTES).
A manifest failing any of them is dropped, never followed; then every part must match its digest.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

PREFIX = b"vlsplit-parts:2\n"
MARK = b"vlsplit-parts:"  # any manifest version; ones before 2 were unsealed and are dropped unread
ENTRY_BYTES = 80  # one part in the JSON: [length, "64 hex digits"], with room
NONCE = re.compile(r"[0-9a-f]{16}")
DIGEST = re.compile(r"[0-9a-f]{64}")


class Rejected(Exception):
    """A manifest that is not followed; the message says why (and names the bound it broke)."""


@dataclass(frozen=True)
class PartBound:
    part_bytes: int  # VLSPLIT_CACHE_PART_BYTES
    max_entry_bytes: int  # VLSPLIT_CACHE_MAX_ENTRY_BYTES

    @property
    def max_parts(self) -> int:
        return max(1, -(-self.max_entry_bytes // self.part_bytes))

    @property
    def max_manifest_bytes(self) -> int:
        return len(PREFIX) + 36 + 128 + ENTRY_BYTES * self.max_parts

    def describe(self) -> str:
        return (f"at most {self.max_parts} parts ({self.max_entry_bytes} bytes, VLSPLIT_CACHE_MAX_ENTRY_BYTES, "
                f"in parts of {self.part_bytes}, VLSPLIT_CACHE_PART_BYTES)")


@dataclass(frozen=True)
class Manifest:
    nonce: str
    parts: tuple[tuple[int, str], ...]  # (length, sha256 hex) of each part, in order

    @classmethod
    def split(cls, nonce: str, value: bytes, part_bytes: int) -> tuple["Manifest", list[memoryview]]:
        view = memoryview(value)
        pieces = [view[i:i + part_bytes] for i in range(0, len(value), part_bytes)]
        return cls(nonce, tuple((len(p), hashlib.sha256(p).hexdigest()) for p in pieces)), pieces

    @property
    def total(self) -> int:
        return sum(length for length, _ in self.parts)

    def part_keys(self, key: str) -> list[str]:
        return [f"{key}:part:{self.nonce}:{i}" for i in range(len(self.parts))]

    def seal(self, key: str, signer=None) -> bytes:
        body = json.dumps({"nonce": self.nonce, "total": self.total, "parts": self.parts},
                          separators=(",", ":")).encode()
        return PREFIX + (signer.seal(_mac_key(key), body) if signer else body)

    def matches(self, pieces: list[bytes]) -> bool:
        return len(pieces) == len(self.parts) and all(
            len(piece) == length and hashlib.sha256(piece).hexdigest() == digest
            for piece, (length, digest) in zip(pieces, self.parts))


def read(key: str, blob: bytes, signer, bound: PartBound) -> Manifest:
    """The manifest stored under `key`, checked; Rejected when it is not to be followed."""
    if not blob.startswith(PREFIX):
        raise Rejected("a manifest of an old or unknown format")
    if len(blob) > bound.max_manifest_bytes:
        raise Rejected(f"a manifest of {len(blob)} bytes, over the {bound.max_manifest_bytes} of one naming "
                       f"{bound.describe()}")
    body = blob[len(PREFIX):]
    if signer is not None:
        body, why = signer.open(_mac_key(key), body)
        if body is None:
            raise Rejected(f"an {why} manifest" if why == "unsigned" else f"a {why} manifest (its MAC is wrong)")
    manifest = _parse(body)
    if len(manifest.parts) > bound.max_parts:
        raise Rejected(f"a manifest of {len(manifest.parts)} parts; entries have {bound.describe()}")
    return manifest


def _parse(body: bytes) -> Manifest:
    try:
        meta = json.loads(body)
        nonce, total = meta["nonce"], meta["total"]
        parts = tuple((int(length), digest) for length, digest in meta["parts"])
    except (ValueError, KeyError, TypeError):
        raise Rejected("a malformed manifest") from None
    if (not isinstance(nonce, str) or not NONCE.fullmatch(nonce) or not parts
            or any(length < 1 or not isinstance(digest, str) or not DIGEST.fullmatch(digest)
                   for length, digest in parts)
            or total != sum(length for length, _ in parts)):
        raise Rejected("a malformed manifest")
    return Manifest(nonce, parts)


def _mac_key(key: str) -> str:
    """What a manifest's MAC is bound to: its entry's key, apart from the MACs of whole values."""
    return f"{key}:parts"
