"""Prefix KV cache: the decoding state after a prompt's shared prefix (system prompt + image
tokens), kept in an LRU bounded in bytes, so a further question about the same image prefills only
its own tokens.

Keyed by (model fingerprint, image ids, the exact prefix token ids): a different system prompt,
template or image is a different key. Entries are shared, never copied: `DynamicLayer.update`
grows the cache by `torch.cat`, so extending a forked state allocates new tensors and leaves the
cached prefix untouched (tests/test_prefix_cache.py checks it).
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from prometheus_client import Counter, Gauge
from transformers import DynamicCache

HITS = Counter("vlsplit_prefix_cache_hits", "Prompts whose image prefix was found in the prefix KV cache")
MISSES = Counter("vlsplit_prefix_cache_misses", "Prompts whose image prefix had to be prefilled")
EVICTIONS = Counter("vlsplit_prefix_cache_evictions", "Prefix states evicted to stay within the byte bound")
BYTES = Gauge("vlsplit_prefix_cache_bytes", "Bytes of KV state held by the prefix cache")


@dataclass(frozen=True)
class PrefixKey:
    fingerprint: str
    image_ids: tuple[str, ...]
    token_digest: str  # blake2b of the prefix token ids

    @classmethod
    def of(cls, fingerprint: str, image_ids: tuple[str, ...], prefix_ids: torch.Tensor) -> "PrefixKey":
        digest = hashlib.blake2b(prefix_ids.numpy().tobytes(), digest_size=16).hexdigest()
        return cls(fingerprint, tuple(image_ids), digest)


def fork(cache: DynamicCache) -> DynamicCache:
    """A new cache sharing the tensors of `cache`; appending to either leaves the other unchanged."""
    forked = copy.copy(cache)
    forked.layers = [copy.copy(layer) for layer in cache.layers]
    return forked


def cache_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers if layer.is_initialized
               for t in (layer.keys, layer.values))


class PrefixCache:
    """Thread-safe LRU of (DynamicCache, next_positions) by PrefixKey, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used = 0
        self.entries: OrderedDict[PrefixKey, tuple[DynamicCache, torch.Tensor, int]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: PrefixKey) -> tuple[DynamicCache, torch.Tensor] | None:
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                MISSES.inc()
                return None
            self.entries.move_to_end(key)
            HITS.inc()
            return fork(entry[0]), entry[1]

    def put(self, key: PrefixKey, cache: DynamicCache, next_positions: torch.Tensor) -> None:
        size = cache_bytes(cache)
        if size > self.max_bytes:
            return
        with self.lock:
            if key in self.entries:
                return
            self.entries[key] = (fork(cache), next_positions, size)
            self.used += size
            while self.used > self.max_bytes:
                _, (_, _, old) = self.entries.popitem(last=False)
                self.used -= old
                EVICTIONS.inc()
            BYTES.set(self.used)

    def __contains__(self, key: PrefixKey) -> bool:
        with self.lock:
            return key in self.entries
