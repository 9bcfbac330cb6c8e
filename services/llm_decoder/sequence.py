"""A sequence: one prompt and the tokens generated after it, with where its KV lives.

`Prompt` is what a conversation renders to (token ids, M-RoPE positions, where its images sit and
their embeddings); it is shared by every sequence made from it. `Sequence` is the scheduler's unit:
its tokens, how many of them have KV in the pool (`computed`), its block table, and the chain
hashes of its full blocks (what prefix reuse looks up).
"""

from __future__ import annotations

import enum
import functools
import itertools
from dataclasses import dataclass, field

import torch

from .block_manager import Hash, block_hash


@dataclass(frozen=True)
class ImageSpan:
    start: int  # token index of the image's first token in the prompt
    length: int  # its tokens
    key: str  # "<image id>/<t>x<h>x<w>": equal keys mean equal embeddings and positions
    row: int  # first row of its embeddings in Prompt.embeddings


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    positions: torch.Tensor  # [3, L] M-RoPE (temporal, height, width) positions, on CPU
    next_position: int  # position of the first token after the prompt (on all three axes)
    images: tuple[ImageSpan, ...] = ()
    embeddings: torch.Tensor | None = None  # [image tokens, hidden] on the model's device; None: all cached
    deepstack: tuple[torch.Tensor, ...] = ()  # Qwen3-VL: per level [image tokens, hidden]
    cache_point: int = 0  # tokens up to and including the last image's <|vision_end|> (0: no image)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def image_tokens(self) -> int:
        return sum(span.length for span in self.images)

    @property
    def image_end(self) -> int:
        """One past the last image token (0 without images)."""
        return max((span.start + span.length for span in self.images), default=0)

    def extras(self, start: int, end: int) -> tuple:
        """(image key, offset into that image) of each image whose tokens lie in [start, end)."""
        return tuple((s.key, max(start, s.start) - s.start) for s in self.images
                     if s.start < end and start < s.start + s.length)

    def image_refs(self, start: int, end: int) -> list[tuple[str, int] | None]:
        """Per token of [start, end) (clipped to the prompt): (image key, index in that image) or None."""
        refs: list[tuple[str, int] | None] = [None] * (min(end, len(self.ids)) - start)
        for s in self.images:
            for i in range(max(start, s.start), min(end, s.start + s.length)):
                refs[i - start] = (s.key, i - s.start)
        return refs

    def image_rows(self, start: int, end: int) -> tuple[list[int], list[int]]:
        """Image tokens in [start, end): their offsets from `start` and their embedding rows."""
        offsets, rows = [], []
        for s in self.images:
            lo, hi = max(start, s.start), min(end, s.start + s.length)
            offsets.extend(range(lo - start, hi - start))
            rows.extend(range(s.row + lo - s.start, s.row + hi - s.start))
        return offsets, rows


class Status(enum.Enum):
    WAITING = "waiting"  # not admitted: holds no block (its request may pin cached ones)
    RUNNING = "running"  # admitted: prefilling in chunks, then decoding one token a step
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    prompt: Prompt
    root: Hash  # the chain's root hash (model fingerprint, dtype, block size)
    block_size: int
    max_new_tokens: int  # 0: prefill only (Classify)
    index: int = 0  # which conversation (or check) of its request
    label: int = -1  # Classify label rows: which label of the check
    logits: str = "last"  # which new positions need logits: "last" or "all" (label scoring)
    tokens: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose KV is in the pool
    block_table: list[int] = field(default_factory=list)
    hashes: list[Hash] = field(default_factory=list)  # chain hashes of full blocks, as far as tokens are known
    worst: int = 0  # the most blocks it (and rows forked from it) can ever hold: promised at admission
    promise: int = 0  # of those, blocks it may still allocate
    status: Status = Status.WAITING
    request: object = None  # the engine Request it belongs to
    id: int = field(default_factory=lambda: next(_ids))

    def __post_init__(self):
        if not self.tokens:
            self.tokens = list(self.prompt.ids)
        self._extend_hashes()

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def generated(self) -> int:
        return len(self.tokens) - len(self.prompt)

    @property
    def pending(self) -> int:
        """Tokens whose KV is still to be computed before the next logits."""
        return len(self.tokens) - self.computed

    def append(self, token: int) -> None:
        self.tokens.append(token)
        self._extend_hashes()

    def positions(self, start: int, n: int) -> torch.Tensor:
        """M-RoPE positions [3, n] of tokens [start, start + n)."""
        prompt_len = len(self.prompt)
        head = self.prompt.positions[:, start:min(start + n, prompt_len)]
        tail_start = max(start, prompt_len)
        if tail_start >= start + n:
            return head
        tail = torch.arange(tail_start, start + n) - prompt_len + self.prompt.next_position
        return torch.cat([head, tail.expand(3, -1)], dim=1)

    def slots(self, start: int, end: int) -> torch.Tensor:
        """Pool slots [end - start] of tokens [start, end) (their blocks must be allocated)."""
        bs, first = self.block_size, start // self.block_size
        blocks = torch.tensor(self.block_table[first:-(-end // bs)])
        return (blocks[:, None] * bs + torch.arange(bs)).flatten()[start - first * bs:end - first * bs]

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def content(self, start: int, end: int) -> list[tuple]:
        """(token id, image reference or None) of tokens [start, end): what a cached block is compared by."""
        end = min(end, len(self.tokens))
        refs = self.prompt.image_refs(start, end) if start < len(self.prompt) else []
        return [(t, refs[i] if i < len(refs) else None) for i, t in enumerate(self.tokens[start:end])]

    @functools.cached_property
    def cache_key(self) -> Hash | None:
        """Identifies the prompt's prefix up to its cache point (None without images)."""
        point, bs = self.prompt.cache_point, self.block_size
        if not point:
            return None
        if point % bs == 0:
            return self.hashes[point // bs - 1]
        b = point // bs
        return self.partial_hash(self.parent_hash(b), b * bs, point % bs)

    def partial_hash(self, parent: Hash, start: int, n: int) -> Hash:
        return block_hash(parent, self.tokens[start:start + n], self.prompt.extras(start, start + n))

    def parent_hash(self, block: int) -> Hash:
        """Hash of the full block before `block` (the root for block 0)."""
        return self.hashes[block - 1] if block else self.root

    def _extend_hashes(self) -> None:
        bs = self.block_size
        for b in range(len(self.hashes), len(self.tokens) // bs):
            start = b * bs
            self.hashes.append(block_hash(self.parent_hash(b), self.tokens[start:start + bs],
                                          self.prompt.extras(start, start + bs)))
