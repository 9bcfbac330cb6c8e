"""Attention over the block KV pool for one packed step, as a transformers attention function.

A step packs every scheduled sequence's new tokens into one [1, N] batch (no padding for the
projections and MLPs). Each layer's attention module calls `paged_attention`, which writes the new
keys and values into the pool and attends each sequence's queries to its own context:

- decode rows (one new token each) that share nothing, with the paged kernel on (`decode_attention`
  "paged", or "auto" where it compiles): all of them in ONE `flex_attention` call over the pool in
  place, its block mask built from their block tables (paged_kernel.py) — no context is copied;
- a sequence alone (a prefill chunk, or a decode row under "gather"): its context's slots are
  gathered and run through transformers' own SDPA attention, exactly as the monolithic model does;
- rows sharing a cached prefix (AskMany's questions, Classify's labels, clients asking about the
  same image), each with a few queries: the cascade. The shared prefix's K/V are read once and
  multiplied with every row's queries together; each row's own tail is attended separately; one
  softmax spans both parts (scores are joined before it, so no log-sum-exp merge is needed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .kv_pool import KVPool
from .paged_kernel import PagedRows, paged_decode

NAME = "vlsplit_paged"
CASCADE_MAX_QUERIES = 32  # rows with more new tokens than this are attended alone (SDPA)
CASCADE_MAX_SCORES = 1 << 25  # score elements per cascade chunk (bounds its temporary memory)


@dataclass
class Alone:
    """A sequence attended by itself: queries [q0, q1) of the packed batch, `start` cached tokens before them."""

    q0: int
    q1: int
    slots: torch.Tensor  # [start + n]: its whole context, the new tokens included
    mask: torch.Tensor | None  # [1, 1, n, start + n] bottom-right causal; None: SDPA's own (or none) fits

    @classmethod
    def of(cls, q0: int, n: int, start: int, slots: torch.Tensor) -> "Alone":
        mask = None
        if start and n > 1:
            keys = torch.arange(start + n, device=slots.device)
            queries = torch.arange(start, start + n, device=slots.device)
            mask = (keys[None, :] <= queries[:, None])[None, None]
        return cls(q0, q0 + n, slots, mask)


@dataclass
class Cascade:
    """Rows sharing their first len(prefix_slots) context tokens, each with at most a few queries."""

    prefix_slots: torch.Tensor  # [P]
    queries: torch.Tensor  # [R, n] packed query index, padding repeats a valid one
    own_slots: torch.Tensor  # [R, S] context after the prefix, padded
    visible: torch.Tensor  # [R, n, S] bool: own key s is visible to query j
    picks: torch.Tensor  # [V] positions in the flattened [R * n] grid that are real queries
    targets: torch.Tensor  # [V] their packed query index


@dataclass
class StepAttention:
    """Everything a layer's attention needs for one step (built once, used by every layer)."""

    pool: KVPool
    slots: torch.Tensor  # [N] where the packed new tokens' K/V go
    alone: list[Alone] = field(default_factory=list)
    cascades: list[Cascade] = field(default_factory=list)
    paged: PagedRows | None = None


def paged_attention(module, query, key, value, attention_mask, scaling=None, vlsplit: StepAttention | None = None,
                    **kwargs):
    """query [1, Hq, N, D], key/value [1, Hkv, N, D] for the packed new tokens -> ([1, N, Hq, D], None)."""
    step, layer = vlsplit, module.layer_idx
    step.pool.write(layer, step.slots, key[0], value[0])
    out = query.new_empty(query.shape[2], query.shape[1], query.shape[3])  # [N, Hq, D]
    for row in step.alone:
        k, v = step.pool.gather(layer, row.slots)
        o, _ = sdpa_attention_forward(module, query[:, :, row.q0:row.q1], k[None], v[None], row.mask, scaling=scaling)
        out[row.q0:row.q1] = o[0]
    if step.paged is not None:
        out[step.paged.queries] = paged_decode(query[0], step.pool, layer, step.paged, scaling)
    for group in step.cascades:
        grid = _cascade(query[0], step.pool, layer, group, scaling)
        out.index_copy_(0, group.targets, grid.flatten(0, 1).index_select(0, group.picks))
    return out[None], None


def _cascade(q: torch.Tensor, pool: KVPool, layer: int, group: Cascade, scale: float) -> torch.Tensor:
    """q [Hq, N, D] -> [R, n, Hq, D] for the group's query grid (padding included).

    Computed in float32 whatever the model's dtype: these matmuls are small, float32 keeps the
    softmax exact, and CPUs without bf16 instructions run bf16 batched matmuls far slower."""
    kp, vp = (t.float() for t in pool.gather(layer, group.prefix_slots))  # [Hkv, P, D], read once for all rows
    kv_heads, prefix, dim = kp.shape
    rows, n = group.queries.shape
    own = group.own_slots.shape[1]
    groups = q.shape[0] // kv_heads
    # [Hq, R*n, D] -> [Hkv, R, n, G, D]: query heads grouped under their KV head
    qs = q[:, group.queries.reshape(-1)].float().view(kv_heads, groups, rows, n, dim).permute(0, 2, 3, 1, 4)
    ko, vo = (t.float().view(kv_heads, rows, own, dim) for t in pool.gather(layer, group.own_slots.reshape(-1)))
    sp = torch.matmul(qs.reshape(kv_heads, rows * n * groups, dim), kp.transpose(1, 2)) * scale
    so = torch.matmul(qs.reshape(kv_heads, rows, n * groups, dim), ko.transpose(2, 3)) * scale
    sp = sp.view(kv_heads, rows, n, groups, prefix)
    so = so.view(kv_heads, rows, n, groups, own).masked_fill(~group.visible[None, :, :, None, :], float("-inf"))
    top = torch.maximum(sp.amax(-1), so.amax(-1))[..., None]  # [Hkv, R, n, G, 1]
    ep, eo = torch.exp(sp - top), torch.exp(so - top)
    total = ep.sum(-1, keepdim=True) + eo.sum(-1, keepdim=True)
    out = torch.matmul(ep.view(kv_heads, rows * n * groups, prefix), vp).view(kv_heads, rows, n, groups, dim)
    out = out + torch.matmul(eo.view(kv_heads, rows, n * groups, own), vo).view(kv_heads, rows, n, groups, dim)
    out = (out / total).to(q.dtype)
    return out.permute(1, 2, 0, 3, 4).reshape(rows, n, kv_heads * groups, dim)


def cascade_rows(rows: int, n: int, prefix: int, heads: int) -> int:
    """How many rows one cascade chunk may hold so its scores stay within CASCADE_MAX_SCORES."""
    return max(1, CASCADE_MAX_SCORES // max(1, n * heads * prefix))


AttentionInterface.register(NAME, paged_attention)
