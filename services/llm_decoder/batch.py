"""Many questions about the same image(s), decoded as one batch.

The shared image prefix is prefilled once (or taken from the prefix cache); each question's own
tokens are prefilled on a fork of it; then all sequences decode together, one forward per step.
Rows have different lengths, so the batch KV puts each row's question tokens right after the
shared prefix, padded in between, with an attention mask that hides the padding; M-RoPE positions
are explicit per row, so padding never shifts them. Finished rows leave the batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from transformers import DynamicCache

from .detokenizer import Detokenizer
from .engine import DecoderEngine, GenerationRequest, KVState, TokenEvent, Usage
from .prefix_cache import fork
from .sampling import Sampler


@dataclass
class Row:
    index: int  # position of the request in the batch call
    sampler: Sampler
    detok: Detokenizer
    max_new_tokens: int
    usage: Usage
    next_positions: torch.Tensor  # [4]
    logits: torch.Tensor  # [vocab] for the next token
    steps: int = 0
    emit: Callable[[object], None] | None = None  # continuous batching: where this row's events go
    cancelled: Callable[[], bool] = lambda: False


class Batch:
    """Rows decoding together over one padded DynamicCache."""

    def __init__(self, engine: DecoderEngine, rows: list[Row], states: list[KVState], prefix_len: int):
        self.engine, self.rows = engine, rows
        self.cache, self.mask = _merge([s.cache for s in states], prefix_len)

    def add(self, row: Row, state: KVState) -> None:
        """Join a row with its own KV: the shorter side is left-padded (masked) to the longer."""
        length, total = state.cache.get_seq_length(), self.mask.shape[1]
        if length > total:
            _left_pad(self.cache, length - total)
            self.mask = torch.cat([self.mask.new_zeros(len(self.rows), length - total), self.mask], dim=1)
            total = length
        joining = fork(state.cache)
        _left_pad(joining, total - length)
        for layer, new in zip(self.cache.layers, joining.layers):
            layer.keys, layer.values = torch.cat([layer.keys, new.keys]), torch.cat([layer.values, new.values])
        row_mask = torch.cat([self.mask.new_zeros(1, total - length), self.mask.new_ones(1, length)], dim=1)
        self.mask = torch.cat([self.mask, row_mask])
        self.rows.append(row)

    def trim(self) -> None:
        """Drop leading columns that are padding in every row (left behind by rows that finished)."""
        live = self.mask.any(dim=0).nonzero()
        start = int(live[0]) if len(live) else self.mask.shape[1]
        if start:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
            self.mask = self.mask[:, start:]

    def step(self, tokens: list[int]) -> None:
        """Feed one token per row; refresh each row's logits."""
        engine = self.engine
        ids = torch.tensor(tokens, device=engine.device)[:, None]  # [B, 1]
        positions = torch.stack([r.next_positions for r in self.rows], dim=1)[:, :, None]  # [4, B, 1]
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=self.mask.dtype)], dim=1)
        logits = engine.forward_batch(engine.text_model.embed_tokens(ids), positions, self.cache, self.mask)
        for row, row_logits in zip(self.rows, logits):
            row.logits = row_logits
            row.next_positions = row.next_positions + 1

    def keep(self, keep: list[int]) -> None:
        """Drop every row whose batch position is not in `keep`."""
        if len(keep) == len(self.rows):
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.engine.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.rows = [self.rows[i] for i in keep]


def generate_batch(engine: DecoderEngine, requests: list[GenerationRequest],
                   cancelled: Callable[[], bool] = lambda: False) -> Iterator[tuple[int, TokenEvent]]:
    """Stream (request index, event) for requests that share their images and prefix.

    Requests whose prompts do not share one image prefix are answered one after another instead.
    """
    params = [r.sampling.validate(engine.max_new_tokens_limit) for r in requests]
    prompts = [engine.request_prompt(r) for r in requests]
    if not _shared_prefix(prompts):
        for i, request in enumerate(requests):
            yield from ((i, event) for event in engine.generate(request, cancelled))
        return
    warm = requests[0].warm
    base = warm.state if warm is not None else engine.prefix_state(prompts[0], requests[0].image_ids)
    rows, states = [], []
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        state, logits = engine._prefill_chunk(prompt, prompt.prefix_len, len(prompt.ids),
                                              KVState(fork(base.cache), base.next_positions))
        usage = Usage(len(prompt.ids), int(prompt.visual_mask.sum()), 0)
        rows.append(Row(i, Sampler(p), Detokenizer(engine.prompts.decode, p.stop), p.max_new_tokens, usage,
                        state.next_positions, logits))
        states.append(state)
    batch = Batch(engine, rows, states, prompts[0].prefix_len)
    while batch.rows and not cancelled():
        keep, tokens = [], []
        for position, row in enumerate(batch.rows):
            token, event = advance(engine, row)
            yield row.index, event
            if event.finish_reason is None:
                keep.append(position)
                tokens.append(token)
        batch.keep(keep)
        if batch.rows:
            batch.step(tokens)


def advance(engine: DecoderEngine, row: Row) -> tuple[int, TokenEvent]:
    """Choose the row's next token; the event to stream for it (finished rows get a final event)."""
    token = row.sampler(row.logits)
    if token in engine.eos_ids:
        return token, TokenEvent(None, row.detok.flush(), "stop", row.usage)
    row.steps += 1
    row.usage = dataclasses.replace(row.usage, completion_tokens=row.steps)
    delta = row.detok.add(token)
    if row.detok.stopped:
        return token, TokenEvent(token, delta, "stop", row.usage)
    if row.steps == row.max_new_tokens:
        return token, TokenEvent(token, delta + row.detok.flush(), "length", row.usage)
    return token, TokenEvent(token, delta)


def _shared_prefix(prompts) -> bool:
    first = prompts[0]
    return first.prefix_len > 0 and all(
        p.prefix_len == first.prefix_len and torch.equal(p.ids[: p.prefix_len], first.ids[: first.prefix_len])
        for p in prompts)


def _merge(caches: list[DynamicCache], prefix_len: int) -> tuple[DynamicCache, torch.Tensor]:
    """One batch cache [B, heads, T, dim] from single-row caches that share their first `prefix_len`
    positions: each row is prefix | zero padding | its own tokens. Returns it and the mask [B, T]."""
    lengths = [c.get_seq_length() for c in caches]
    total = max(lengths)
    merged = fork(caches[0])
    for layer_index, layer in enumerate(merged.layers):
        keys, values = [], []
        for cache, length in zip(caches, lengths):
            row = cache.layers[layer_index]
            keys.append(_pad(row.keys, prefix_len, total - length))
            values.append(_pad(row.values, prefix_len, total - length))
        layer.keys, layer.values = torch.cat(keys), torch.cat(values)
    mask = torch.ones(len(caches), total, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, prefix_len: prefix_len + total - length] = 0
    return merged, mask


def _left_pad(cache: DynamicCache, n: int) -> None:
    if n:
        for layer in cache.layers:
            layer.keys, layer.values = _pad(layer.keys, 0, n), _pad(layer.values, 0, n)


def _pad(t: torch.Tensor, at: int, n: int) -> torch.Tensor:
    """Insert `n` zero positions at sequence index `at` of a [B, heads, T, dim] tensor."""
    if n == 0:
        return t
    zeros = t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3])
    return torch.cat([t[:, :, :at], zeros, t[:, :, at:]], dim=2)
