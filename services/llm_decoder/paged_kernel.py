"""Decode attention over the KV pool in place: every one-token row of a step in one `flex_attention` call.

A layer's pool tensors ([kv_heads, slots, head_dim], kv_pool.py) are flex_attention's keys and values
as they lie (batch 1, broadcast over the rows). Each row's block mask lists its context's blocks by
their physical index: every block but the last is "full" (no mask evaluated in it), the last is
"partial", where `mask_mod` keeps the offsets below the row's length. Nothing is gathered or copied;
the kernel reads each row's keys where they are, and all rows (and heads) run in one call.

The kernel is torch.compile's (inductor's C++ flex-attention template on CPU, Triton on CUDA),
compiled once per process, dynamic in the number of rows (inductor caches the generated code on
disk, so a second start takes seconds). `resolve` compiles it at load ("auto": falls back to the
gathered SDPA path when it cannot, e.g. no C++ compiler; "paged": fails the start instead).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .kv_pool import KVPool

log = logging.getLogger("vlsplit.decoder")

MODES = ("auto", "paged", "gather")
_compiled = None


def check_decode_attention(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"decode_attention must be one of {', '.join(MODES)}, not {mode!r}")


def _kernel():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=True)
    return _compiled


@dataclass
class PagedRows:
    """Rows of one step with one new token each, attended over the pool in place."""

    queries: torch.Tensor  # [R] packed query index of each row's token
    mask: BlockMask  # [R, 1] rows x 1 query; keys = every pool slot


class PagedPlanner:
    """Builds each step's block mask. Its block lists are as wide as the pool (the kernel asks so), in
    buffers kept across steps: a row writes only its own blocks, the kernel reads no further."""

    def __init__(self, pool: KVPool, device: torch.device):
        self.pool, self.device = pool, device
        self.full = self.partial = torch.empty(0, 1, 1, pool.num_blocks, dtype=torch.int32, device=device)

    def plan(self, queries: list[int], tables: list[list[int]], lengths: list[int]) -> PagedRows:
        """tables: each row's block table; lengths: its context (the new token included)."""
        bs, rows, device = self.pool.block_size, len(queries), self.device
        if self.full.shape[0] < rows:
            self.full, self.partial = (torch.empty(rows, 1, 1, self.pool.num_blocks, dtype=torch.int32, device=device)
                                       for _ in range(2))
        blocks = [-(-n // bs) for n in lengths]
        width = max(blocks)
        lists = torch.tensor([t[:nb] + [0] * (width - nb) for t, nb in zip(tables, blocks)], dtype=torch.int32)
        full, partial = self.full[:rows], self.partial[:rows]
        full[:, 0, 0, :width] = lists.to(device)
        partial[:, 0, 0, 0] = lists[torch.arange(rows), torch.tensor(blocks) - 1].to(device)  # each row's last block
        # keys valid in each row's last block: offsets 0 .. tail-1
        tail = torch.tensor([n - (nb - 1) * bs for n, nb in zip(lengths, blocks)], device=device)

        def mask_mod(b, h, q, kv):
            return (kv % bs) < tail[b]

        mask = BlockMask.from_kv_blocks(
            torch.ones(rows, 1, 1, dtype=torch.int32, device=device), partial,
            (torch.tensor(blocks, dtype=torch.int32, device=device) - 1).view(rows, 1, 1), full,
            BLOCK_SIZE=(1, bs), mask_mod=mask_mod, seq_lengths=(1, self.pool.slots), compute_q_blocks=False)
        return PagedRows(torch.tensor(queries, device=device), mask)


def paged_decode(q: torch.Tensor, pool: KVPool, layer: int, rows: PagedRows, scale: float | None) -> torch.Tensor:
    """q [Hq, N, D] (the step's packed queries) -> [R, Hq, D] for the paged rows."""
    queries = q[:, rows.queries].transpose(0, 1)[:, :, None]  # [R, Hq, 1, D]
    keys, values = pool.kv[layer, 0][None], pool.kv[layer, 1][None]  # [1, Hkv, slots, D]: views, no copy
    out = _kernel()(queries, keys, values, block_mask=rows.mask, scale=scale, enable_gqa=True)
    return out[:, :, 0]


@torch.inference_mode()
def warm(pool: KVPool, heads: int, head_dim: int, device: torch.device) -> None:
    """Compile the kernel for one row and for several (the two specialisations it gets)."""
    scale = head_dim ** -0.5
    for rows in (1, 2):
        q = torch.zeros(heads, rows, head_dim, dtype=pool.kv.dtype, device=device)
        paged_decode(q, pool, 0, PagedPlanner(pool, device).plan(list(range(rows)), [[0]] * rows, [1] * rows), scale)


def resolve(mode: str, pool: KVPool, heads: int, head_dim: int, device: torch.device) -> tuple[bool, str]:
    """Whether decode rows run on the paged kernel, and why (compiles it now when they do)."""
    check_decode_attention(mode)
    if mode == "gather":
        return False, "gather (decode_attention=gather)"
    try:
        warm(pool, heads, head_dim, device)
    except Exception as error:  # noqa: BLE001 - any compile failure: the reason goes to the log
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}"
        if mode == "paged":
            raise RuntimeError(f"decode_attention=paged: the paged kernel does not compile here ({reason})") from error
        log.warning("paged decode attention unavailable, gathering each row's context instead (%s)", reason)
        return False, f"gather (paged kernel unavailable: {reason})"
    return True, "paged (flex_attention over the KV pool)"
