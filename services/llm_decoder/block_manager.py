"""KV block accounting: which block of the pool holds which tokens, who references it, what is cached.

The pool (kv_pool.py) is allocated once; this module only hands out block ids. A block is
- *referenced* while a sequence's block table holds it (ref > 0),
- *cached* when its tokens are known: a full block under the chain hash of every token up to its
  end (image positions hashed by image id; the chain is rooted in the model fingerprint), or a
  partial block (a snapshot at an image's end, or the tail a finished sequence leaves) under its
  parent block's hash, with the tokens it holds,
- *evictable* when cached and unreferenced: kept for reuse, reclaimed least recently used first.

A prompt reuses the longest chain of cached full blocks, then the cached block after that chain
whose leading tokens continue it furthest (tokens compared with the image and offset of each image
token), so a second turn reuses the first turn up to its first differing token. That last block is
copied (copy on write: a sequence only ever writes into blocks of its own). Classify's label rows
fork their check's sequence: its full blocks shared, its last partial block copied.

Admission keeps one invariant, so allocation never fails and nothing is ever preempted:
    referenced blocks + blocks promised to admitted sequences <= pool size.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Protocol

from .metrics import BLOCKS_CACHED, BLOCKS_FREE, BLOCKS_USED, EVICTIONS

Hash = bytes


def root_hash(*parts: object) -> Hash:
    """The chain's root: everything that makes equal tokens give different KV (model, dtype, block size)."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()


def block_hash(parent: Hash, tokens: list[int], extras: tuple = ()) -> Hash:
    """Hash of a block's tokens after `parent`. `extras` names the images whose tokens the block
    holds, as (image key, offset of the block's first token of it in the image)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b"".join(t.to_bytes(4, "little") for t in tokens))
    if extras:
        h.update(repr(extras).encode())
    return h.digest()


Content = list[tuple]  # per token: (token id, None) or (token id, (image key, index in the image))


class Prompted(Protocol):
    """What matching needs of a sequence."""

    root: Hash
    hashes: list[Hash]

    def content(self, start: int, end: int) -> Content: ...


@dataclass
class Block:
    id: int
    ref: int = 0
    parent: Hash | None = None  # set while cached: the hash of the block before it (or the root)
    hash: Hash | None = None  # a cached full block's chain hash
    content: Content = field(default_factory=list)  # what it holds while cached


@dataclass
class Match:
    """What a prompt reuses: cached full blocks, then maybe part of one more block, to copy."""

    blocks: list[int] = field(default_factory=list)
    tail: int | None = None  # a block whose first `tail_tokens` tokens continue the prompt
    tail_tokens: int = 0
    tokens: int = 0  # prompt tokens covered in all


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, copy_block: Callable[[int, int], None], caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.caching = caching  # False: nothing is kept for reuse (forks still share their parent's blocks)
        self.copy_block = copy_block  # (src, dst): copies a block's KV in the pool
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() takes the lowest id first
        self.evictable: OrderedDict[int, None] = OrderedDict()  # LRU order: oldest first
        self.full: dict[Hash, int] = {}  # chain hash -> full block
        self.children: dict[Hash, dict[int, None]] = {}  # parent hash -> cached blocks after it
        self.referenced = 0
        self.promised = 0  # blocks admitted sequences may still allocate
        self.lock = threading.RLock()

    # ---- lookup -------------------------------------------------------------------------------

    def match(self, seq: Prompted, prompt_len: int, limit: int) -> Match:
        """The longest cached prefix of `seq`'s first `prompt_len` tokens, at most `limit` tokens
        (nothing is referenced yet)."""
        with self.lock:
            out, parent = Match(), seq.root
            for h in seq.hashes[:prompt_len // self.block_size]:
                block = self.full.get(h)
                if block is None or out.tokens + self.block_size > limit:
                    break
                out.blocks.append(block)
                out.tokens += self.block_size
                parent = h
            start = out.tokens
            ours = seq.content(start, min(limit, start + self.block_size))
            for b in self.children.get(parent, ()):
                theirs, n = self.blocks[b].content, 0
                while n < len(ours) and n < len(theirs) and ours[n] == theirs[n]:
                    n += 1
                if n > out.tail_tokens:
                    out.tail, out.tail_tokens = b, n
            out.tokens += out.tail_tokens
            return out

    # ---- references ---------------------------------------------------------------------------

    def acquire(self, blocks: list[int]) -> None:
        """Reference cached blocks (a sequence reuses them)."""
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
                    if block.parent is not None:
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

    def register(self, b: int, parent: Hash, content: Content, h: Hash | None = None) -> None:
        """Block `b` holds `content` after the block hashing to `parent`; a full block comes with its
        chain hash `h`. The first block registered for a content wins."""
        with self.lock:
            block = self.blocks[b]
            known = h in self.full if h is not None else self._cached(parent, content)
            if not self.caching or block.parent is not None or known:
                return
            block.parent, block.hash, block.content = parent, h, list(content)
            self.children.setdefault(parent, {})[b] = None
            if h is not None:
                self.full[h] = b
            if block.ref == 0:
                self.evictable[b] = None

    def snapshot(self, b: int, parent: Hash, content: Content) -> None:
        """Keep a copy of partial block `b`, which its sequence goes on writing into (an image's
        end). Skipped when cached already, or when the copy would need a block promised to a sequence."""
        with self.lock:
            if not self.caching or self._cached(parent, content) or not self.can_promise(1):
                return
            dst = self.copy(b)
            self.register(dst, parent, content)
            self.release([dst])

    def _cached(self, parent: Hash, content: Content) -> bool:
        return any(self.blocks[s].content == content for s in self.children.get(parent, ()))

    # ---- admission ----------------------------------------------------------------------------

    def can_promise(self, n: int) -> bool:
        return self.referenced + self.promised + n <= self.num_blocks

    def promise(self, n: int) -> None:
        with self.lock:
            self.promised += n

    @property
    def cached_blocks(self) -> int:
        with self.lock:
            return sum(len(c) for c in self.children.values())

    # ---- internals ----------------------------------------------------------------------------

    def _ref(self, b: int) -> None:
        block = self.blocks[b]
        if block.ref == 0:
            self.referenced += 1
            self.evictable.pop(b, None)
        block.ref += 1

    def _forget(self, block: Block) -> None:
        if block.hash is not None and self.full.get(block.hash) == block.id:
            del self.full[block.hash]
        siblings = self.children.get(block.parent, {})
        siblings.pop(block.id, None)
        if not siblings:
            self.children.pop(block.parent, None)
        block.parent, block.hash, block.content = None, None, []

    def _gauges(self) -> None:
        BLOCKS_USED.set(self.referenced)
        BLOCKS_CACHED.set(len(self.evictable))
        BLOCKS_FREE.set(len(self.free))
