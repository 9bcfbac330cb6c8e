"""KV block accounting: which block of the pool holds which tokens, who references it, what is cached.

The pool (kv_pool.py) is allocated once; this module only hands out block ids. A block is
- *referenced* while a sequence's block table holds it (ref > 0),
- *cached* when its tokens are known by hash: a full block by the chain hash of every token up to
  its end (image positions hashed by image id, the chain rooted in the model fingerprint), or a
  *partial* block (a snapshot at an image end, or the tail a finished sequence leaves behind) by
  its parent's hash and its own tokens,
- *evictable* when cached and unreferenced: kept for reuse, reclaimed least recently used first.

A sequence's prompt reuses the longest chain of cached full blocks, then at most one partial block,
which it copies (copy on write: every block a sequence writes into is its own). Sequences that fork
(Classify's label rows) share every full block of their parent and copy its last partial block.

Admission keeps one invariant, so allocation never fails and nothing is ever preempted:
    referenced blocks + blocks promised to admitted sequences <= pool size.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from prometheus_client import Counter, Gauge

HIT_TOKENS = Counter("vlsplit_kv_cache_hit_tokens", "Prompt tokens whose KV came from cached blocks")
MISS_TOKENS = Counter("vlsplit_kv_cache_miss_tokens", "Prompt tokens whose KV had to be computed")
EVICTIONS = Counter("vlsplit_kv_cache_evictions", "Cached KV blocks reclaimed for new tokens")
BLOCKS_USED = Gauge("vlsplit_kv_blocks_used", "KV blocks referenced by running sequences")
BLOCKS_CACHED = Gauge("vlsplit_kv_blocks_cached", "Unreferenced KV blocks kept for prefix reuse (evictable)")
BLOCKS_FREE = Gauge("vlsplit_kv_blocks_free", "KV blocks holding nothing")

Hash = bytes


def root_hash(*parts: object) -> Hash:
    """The chain's root: everything that makes equal tokens give different KV (model, dtype, block size)."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()


def block_hash(parent: Hash, tokens: list[int], extras: tuple = ()) -> Hash:
    """Hash of a block (or a partial block's tokens) after `parent`. `extras` names the images whose
    tokens the block holds, as (image key, offset of the block's first token of it in the image)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b"".join(t.to_bytes(4, "little") for t in tokens))
    if extras:
        h.update(repr(extras).encode())
    return h.digest()


@dataclass
class Block:
    id: int
    ref: int = 0
    hash: Hash | None = None  # set while registered as a cached full block
    partial: tuple[Hash, Hash] | None = None  # (parent, own hash) while registered as a partial block
    tokens: int = 0  # how many tokens a partial block holds


@dataclass
class Match:
    """What a prompt reuses: cached full blocks, then maybe a partial block to copy."""

    blocks: list[int] = field(default_factory=list)
    partial: int | None = None  # a block to copy into the sequence's own next block
    partial_tokens: int = 0
    tokens: int = 0  # prompt tokens covered in all


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, copy_block: Callable[[int, int], None]):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.copy_block = copy_block  # (src, dst): copies a block's KV in the pool
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() takes the lowest id first
        self.evictable: OrderedDict[int, None] = OrderedDict()  # LRU order: oldest first
        self.full: dict[Hash, int] = {}
        self.partials: dict[Hash, dict[Hash, int]] = {}  # parent hash -> {own hash: block}
        self.referenced = 0
        self.promised = 0  # blocks admitted sequences may still allocate
        self.lock = threading.RLock()

    # ---- lookup -------------------------------------------------------------------------------

    def match(self, root: Hash, hashes: list[Hash], partial_hash: Callable[[Hash, int, int], Hash],
              limit: int) -> Match:
        """The longest cached prefix of a prompt, at most `limit` tokens (nothing is referenced yet).

        hashes: the chain hashes of the prompt's full blocks, rooted at `root`.
        partial_hash(parent, start, n): the hash of the prompt's tokens [start, start + n) as a
        partial block after a block hashing to `parent`.
        """
        with self.lock:
            out, parent = Match(), root
            for h in hashes:
                block = self.full.get(h)
                if block is None or out.tokens + self.block_size > limit:
                    break
                out.blocks.append(block)
                out.tokens += self.block_size
                parent = h
            best = 0
            for h, b in self.partials.get(parent, {}).items():
                n = self.blocks[b].tokens
                if best < n <= limit - out.tokens and partial_hash(parent, out.tokens, n) == h:
                    out.partial, best = b, n
            out.partial_tokens = best
            out.tokens += best
            return out

    # ---- references ---------------------------------------------------------------------------

    def acquire(self, blocks: list[int]) -> None:
        """Reference cached blocks (a sequence reuses them, or a request pins them)."""
        with self.lock:
            for b in blocks:
                self._ref(b)
            self._gauges()

    def release(self, blocks: list[int]) -> None:
        with self.lock:
            for b in blocks:
                block = self.blocks[b]
                block.ref -= 1
                if block.ref == 0:
                    self.referenced -= 1
                    if block.hash is not None or block.partial is not None:
                        self.evictable[b] = None
                    else:
                        self.free.append(b)
            self._gauges()

    def allocate(self) -> int:
        """A block for new tokens, referenced once: a free one, else the least recently used cached one."""
        with self.lock:
            if self.free:
                b = self.free.pop()
            elif self.evictable:
                b, _ = self.evictable.popitem(last=False)
                self._forget(self.blocks[b])
                EVICTIONS.inc()
            else:
                raise RuntimeError("KV pool exhausted: admission let more blocks be used than exist")
            self._ref(b)
            self._gauges()
            return b

    def copy(self, src: int) -> int:
        """A new block holding `src`'s KV (copy on write), referenced once."""
        with self.lock:
            self._ref(src)  # so allocating the copy cannot evict its source
            dst = self.allocate()
            self.copy_block(src, dst)
            self.release([src])
            return dst

    # ---- caching ------------------------------------------------------------------------------

    def register_full(self, block: int, h: Hash) -> None:
        """`block` now holds the full block with chain hash `h` (first writer wins)."""
        with self.lock:
            if h in self.full or self.blocks[block].hash is not None:
                return
            self.blocks[block].hash = h
            self.full[h] = block

    def register_partial(self, block: int, parent: Hash, h: Hash, tokens: int) -> None:
        with self.lock:
            children = self.partials.setdefault(parent, {})
            if h in children or self.blocks[block].partial is not None or self.blocks[block].hash is not None:
                return
            children[h] = block
            self.blocks[block].partial, self.blocks[block].tokens = (parent, h), tokens

    def snapshot_partial(self, block: int, parent: Hash, h: Hash, tokens: int) -> None:
        """Keep a copy of a partial block that its sequence goes on writing into (image ends).
        Skipped when cached already, or when the copy would need a block promised to a sequence."""
        with self.lock:
            if h in self.partials.get(parent, {}) or not self.can_promise(1):
                return
            dst = self.copy(block)
            self.register_partial(dst, parent, h, tokens)
            self.release([dst])

    # ---- admission ----------------------------------------------------------------------------

    def available(self) -> int:
        """Blocks that can be allocated now (free or evictable)."""
        return self.num_blocks - self.referenced

    def can_promise(self, n: int) -> bool:
        return self.referenced + self.promised + n <= self.num_blocks

    def promise(self, n: int) -> None:
        with self.lock:
            self.promised += n

    # ---- internals ----------------------------------------------------------------------------

    def _ref(self, b: int) -> None:
        block = self.blocks[b]
        if block.ref == 0:
            self.referenced += 1
            self.evictable.pop(b, None)
        elif b in self.evictable:  # defensive: a referenced block is never evictable
            del self.evictable[b]
        block.ref += 1
        if block.hash is not None or block.partial is not None:
            self.touch(b)

    def touch(self, b: int) -> None:
        if b in self.evictable:
            self.evictable.move_to_end(b)

    def _forget(self, block: Block) -> None:
        if block.hash is not None:
            self.full.pop(block.hash, None)
            block.hash = None
        if block.partial is not None:
            parent, h = block.partial
            children = self.partials.get(parent, {})
            children.pop(h, None)
            if not children:
                self.partials.pop(parent, None)
            block.partial, block.tokens = None, 0

    def _gauges(self) -> None:
        BLOCKS_USED.set(self.referenced)
        BLOCKS_CACHED.set(len(self.evictable))
        BLOCKS_FREE.set(len(self.free))

    @property
    def cached_blocks(self) -> int:
        with self.lock:
            return len(self.full) + sum(len(c) for c in self.partials.values())
