"""The model runner: ONLY the language weights, and one forward per step over the packed new tokens.

A step's input is every scheduled sequence's next chunk (a prefill chunk, or one decode token),
packed into one [1, N] batch. The runner embeds the tokens (scattering image embeddings in at image
positions), runs transformers' own decoder layers with attention over the KV pool (attention.py),
adds Qwen3-VL's deepstack features after the first layers, and returns logits only where a
sequence needs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.initialization import no_init_weights

from shared.checkpoint import Checkpoint, load_strict
from shared.errors import CheckpointError
from shared.families.base import LM_HEAD
from shared.quantize import check_quantize, quantize_linears, resident_bytes

from shared.packed_linear import MODES, PackedLinear, can_pack, choose_one_row_kernel, pack_linears

from . import attention, paged_kernel
from .attention import Alone, Cascade, StepAttention
from .kv_pool import KVPool
from .paged_kernel import PagedPlanner
from .sequence import Sequence


@dataclass
class Chunk:
    """One sequence's share of a step: tokens [start, start + n)."""

    seq: Sequence
    start: int
    n: int

    @property
    def end(self) -> int:
        return self.start + self.n

    @property
    def wants_logits(self) -> bool:
        """Logits are needed once the chunk reaches the sequence's last known token."""
        return self.end == len(self.seq)


class ModelRunner:
    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device, kv_cache_bytes: int,
                 block_size: int, packed_linear: str = "all", quantize: str = "off", decode_attention: str = "gather"):
        self.checkpoint, self.dtype, self.device = checkpoint, dtype, device
        self.config = checkpoint.config.text_config
        self.text_model, self.lm_head = self._load()
        if packed_linear not in MODES:
            raise ValueError(f"packed_linear must be one of {', '.join(MODES)}, not {packed_linear!r}")
        check_quantize(quantize)
        self.quantize = quantize
        if quantize == "int8":  # shared/quantize.py: the layers' linears (the head and embedding stay as loaded)
            quantize_linears(self.text_model.layers)
            packed_linear = "head" if packed_linear != "off" else "off"  # no float layer weights left to pack
        self.packed = packed_linear if packed_linear != "off" and can_pack(dtype, device) else "off"
        if self.packed != "off":  # weights reordered for oneDNN's small-batch kernels (packed_linear.py)
            # a tied head's dense rows are the embedding's, kept anyway: shared, for one-row calls
            self.lm_head = PackedLinear(self.lm_head.weight, None,
                                        dense=self.lm_head.weight is self.text_model.embed_tokens.weight)
        if self.packed == "all":
            pack_linears(self.text_model.layers, dense=True)
        # bf16: torch.mv or the packed GEMV for one-row calls, whichever this CPU runs faster (timed now)
        self.one_row_kernel = choose_one_row_kernel(
            [m for m in [*self.text_model.modules(), self.lm_head] if isinstance(m, PackedLinear)])
        heads, kv_heads = self.config.num_attention_heads, self.config.num_key_value_heads
        head_dim = getattr(self.config, "head_dim", None) or self.config.hidden_size // heads
        layers = self.config.num_hidden_layers
        per_token = KVPool.bytes_per_token(layers, kv_heads, head_dim, dtype)
        num_blocks = kv_cache_bytes // (per_token * block_size)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_bytes {kv_cache_bytes} holds no block of {block_size} tokens "
                             f"({per_token * block_size} bytes each for this model)")
        self.pool = KVPool(layers, kv_heads, head_dim, num_blocks, block_size, dtype, device)
        self.block_size = block_size
        self.heads = heads
        # decode rows over the pool in place (paged_kernel.py), compiled now; or each row's context gathered
        self.paged_decode, self.decode_attention = paged_kernel.resolve(decode_attention, self.pool, heads, head_dim,
                                                                        device)
        self.paged_planner = PagedPlanner(self.pool, device)

    def _load(self) -> tuple[nn.Module, nn.Linear]:
        config, checkpoint = self.config, self.checkpoint
        config._attn_implementation = "sdpa"
        names = checkpoint.language_names()
        head_names = {n: n for n in names if n == LM_HEAD}
        body_names = {n: m for n, m in names.items() if n != LM_HEAD}
        with no_init_weights():
            text_model = checkpoint.family.text_class._from_config(config, dtype=torch.float32)
        load_strict(text_model, checkpoint.read(body_names, self.dtype))
        config._attn_implementation = attention.NAME  # every layer now attends over the KV pool
        # On the meta device: its weight is replaced just below, so never allocate or init it.
        lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device="meta")
        # A stored head wins even under a tied config, as in transformers' from_pretrained.
        if head_names:
            lm_head.weight = nn.Parameter(checkpoint.read(head_names, self.dtype)[LM_HEAD], requires_grad=False)
        elif checkpoint.config.tie_word_embeddings:
            lm_head.weight = text_model.embed_tokens.weight
        else:
            raise CheckpointError(f"{checkpoint.path}: tie_word_embeddings is false but {LM_HEAD} is missing")
        return text_model.eval().to(self.device), lm_head.eval().to(self.device)

    def weight_bytes(self) -> int:
        """Model weights resident in memory (the KV pool not included)."""
        return resident_bytes(self.text_model, self.lm_head)

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> list[torch.Tensor | None]:
        """One forward over all chunks. Per chunk: logits [vocab] ("last"), [n, vocab] ("all"),
        or None when the chunk ends inside the prompt."""
        ids = torch.tensor([t for c in chunks for t in c.seq.tokens[c.start:c.end]], device=self.device)
        hidden = self.text_model.embed_tokens(ids)  # [N, hidden]
        visual, deepstack = self._scatter_images(chunks, hidden)
        positions = torch.cat([c.seq.positions(c.start, c.n) for c in chunks], dim=1).to(self.device)
        step = self._plan(chunks)
        hidden = self._layers(hidden[None], positions[:, None], step, visual, deepstack)[0]
        return self._logits(chunks, hidden)

    def _scatter_images(self, chunks: list[Chunk], hidden: torch.Tensor) -> tuple[torch.Tensor | None, list]:
        """Put image embeddings in at image positions; return those positions and their deepstack rows."""
        offsets, rows, at = [], [], 0
        for c in chunks:
            o, r = c.seq.prompt.image_rows(c.start, min(c.end, len(c.seq.prompt)))
            if o and c.seq.prompt.embeddings is None:
                raise RuntimeError(f"sequence {c.seq.id} reached image tokens whose KV is not cached and has no payload")
            offsets.extend(at + i for i in o)
            rows.append((c.seq.prompt, r))
            at += c.n
        if not offsets:
            return None, []
        visual = torch.tensor(offsets, device=self.device)
        hidden[visual] = torch.cat([p.embeddings[r] for p, r in rows if r]).to(hidden.dtype)
        levels = max(len(p.deepstack) for p, r in rows if r)
        deepstack = [torch.cat([p.deepstack[level][r] for p, r in rows if r]).to(hidden.dtype) for level in range(levels)]
        return visual, deepstack

    def _layers(self, hidden: torch.Tensor, positions: torch.Tensor, step: StepAttention,
                visual: torch.Tensor | None, deepstack: list[torch.Tensor]) -> torch.Tensor:
        """hidden [1, N, hidden], positions [3, 1, N] -> final hidden states [1, N, hidden]."""
        model = self.text_model
        rope = model.rotary_emb(hidden, positions)
        for i, layer in enumerate(model.layers):
            hidden = layer(hidden, attention_mask=None, position_embeddings=rope, position_ids=None, vlsplit=step)
            if i < len(deepstack):  # Qwen3-VL: visual features of tower layer i join decoder layer i
                hidden = hidden.clone()
                hidden[0, visual] = hidden[0, visual] + deepstack[i]
        return model.norm(hidden)

    def _logits(self, chunks: list[Chunk], hidden: torch.Tensor) -> list[torch.Tensor | None]:
        picks, at = [], 0
        for c in chunks:
            if c.wants_logits:
                picks.append(list(range(at, at + c.n)) if c.seq.logits == "all" else [at + c.n - 1])
            at += c.n
        flat = [i for p in picks for i in p]
        if not flat:
            return [None] * len(chunks)
        logits = self.lm_head(hidden[torch.tensor(flat, device=self.device)]).float()
        out, at = [], 0
        for c in chunks:
            if not c.wants_logits:
                out.append(None)
                continue
            n = c.n if c.seq.logits == "all" else 1
            out.append(logits[at:at + n] if c.seq.logits == "all" else logits[at])
            at += n
        return out

    # ---- attention plan ------------------------------------------------------------------------

    def _plan(self, chunks: list[Chunk]) -> StepAttention:
        slots = torch.cat([c.seq.slots(c.start, c.end) for c in chunks]).to(self.device)
        step = StepAttention(self.pool, slots)
        offsets, at = [], 0
        for c in chunks:
            offsets.append(at)
            at += c.n
        grouped: dict[int, list[int]] = {}
        for i, c in enumerate(chunks):
            if c.n <= attention.CASCADE_MAX_QUERIES and c.start >= self.block_size:
                grouped.setdefault(c.seq.block_table[0], []).append(i)
        in_cascade = set()
        for members in grouped.values():
            shared = self._shared_blocks([chunks[i] for i in members]) if len(members) > 1 else 0
            # worth it while the shared prefix dominates each row's own context (which is padded to
            # the longest): rows sharing only a system prompt before different images attend alone
            members = [i for i in members if chunks[i].end <= 2 * shared * self.block_size]
            if shared and len(members) > 1:
                self._add_cascades(step, [chunks[i] for i in members], [offsets[i] for i in members], shared)
                in_cascade.update(members)
        paged = []
        for i, c in enumerate(chunks):
            if i in in_cascade:
                continue
            if self.paged_decode and c.n == 1:
                paged.append(i)
            else:
                step.alone.append(Alone.of(offsets[i], c.n, c.start, c.seq.slots(0, c.end).to(self.device)))
        if paged:
            step.paged = self.paged_planner.plan([offsets[i] for i in paged], [chunks[i].seq.block_table for i in paged],
                                                 [chunks[i].end for i in paged])
        return step

    def _shared_blocks(self, chunks: list[Chunk]) -> int:
        """Leading blocks that every chunk's sequence holds, full and before its new tokens."""
        limit = min(c.start for c in chunks) // self.block_size
        tables = [c.seq.block_table for c in chunks]
        n = 0
        while n < limit and all(t[n] == tables[0][n] for t in tables):
            n += 1
        return n

    def _add_cascades(self, step: StepAttention, chunks: list[Chunk], offsets: list[int], shared: int) -> None:
        prefix = shared * self.block_size
        first = chunks[0].seq
        prefix_slots = first.slots(0, prefix).to(self.device)
        n = max(c.n for c in chunks)
        per = attention.cascade_rows(len(chunks), n, prefix, self.heads)
        for lo in range(0, len(chunks), per):
            part, part_offsets = chunks[lo:lo + per], offsets[lo:lo + per]
            own = max(c.end - prefix for c in part)
            queries = torch.zeros(len(part), n, dtype=torch.long)
            valid = torch.zeros(len(part), n, dtype=torch.bool)
            own_slots = torch.zeros(len(part), own, dtype=torch.long)
            visible = torch.zeros(len(part), n, own, dtype=torch.bool)
            for r, (c, at) in enumerate(zip(part, part_offsets)):
                queries[r] = at  # padding repeats the row's first query
                queries[r, :c.n] = torch.arange(at, at + c.n)
                valid[r, :c.n] = True
                slots = c.seq.slots(prefix, c.end)
                own_slots[r] = slots[0]  # padding repeats a written slot: masked, and finite (0 x V = 0)
                own_slots[r, :c.end - prefix] = slots
                # own key s sits at position prefix + s; query j at c.start + j
                visible[r, :c.n, :c.end - prefix] = (torch.arange(c.end - prefix)[None, :] + prefix
                                                    <= torch.arange(c.start, c.end)[:, None])
            picks = valid.flatten().nonzero()[:, 0]
            step.cascades.append(Cascade(prefix_slots, *(t.to(self.device) for t in (
                queries, own_slots, visible, picks, queries.flatten()[picks]))))
