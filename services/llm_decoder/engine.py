"""Decoder engine: loads ONLY the language weights and generates from precomputed image embeddings.

The generation loop is ours (prefill, then one decode step per token over the text model's
forward), with the KV cache held in a `KVState` value per sequence: nothing request-specific lives
on the shared model, so concurrent generations are safe, and later features (prefix-KV reuse,
batched questions) build on the same steps. `model.generate` stays the reference in the tests.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from prometheus_client import Counter
from torch import nn
from transformers import DynamicCache, GenerationConfig
from transformers.initialization import no_init_weights

from vlsplit.shared.checkpoint import Checkpoint, load_strict
from vlsplit.shared.codec import validate_payload
from vlsplit.shared.errors import CheckpointError, CorruptPayload, ModelMismatch
from vlsplit.shared.families.base import LM_HEAD
from vlsplit.shared.fingerprint import compute_fingerprint
from vlsplit.shared.payload import EmbeddingPayload
from vlsplit.shared.processor import Message, PromptBuilder, PromptInputs

from .detokenizer import Detokenizer
from .positions import mrope_positions
from .prefix_cache import PrefixCache, PrefixKey
from .sampling import Sampler, SamplingParams

log = logging.getLogger("vlsplit.decoder")
MAX_REMEMBERED_IMAGES = 100_000  # image_id -> grid entries kept for warm starts (a few MB)
PREFILL_TOKENS = Counter("vlsplit_decoder_prefill_tokens", "Prompt tokens run through the model (prefix hits skip theirs)")


@dataclass(frozen=True)
class GenerationRequest:
    messages: list[Message]
    payloads: list[EmbeddingPayload]  # one per image part of `messages`, in order
    sampling: SamplingParams = SamplingParams()
    image_ids: tuple[str, ...] = ()  # content ids of the payloads' images: enables prefix-KV reuse
    warm: "WarmStart | None" = None  # from `warm_start`: then `payloads` may be empty


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # image tokens included
    image_tokens: int
    completion_tokens: int  # generated, the final EOS not counted


@dataclass(frozen=True)
class TokenEvent:
    """One step of a streamed generation. The last event has `finish_reason` and `usage` set."""

    token_id: int | None  # None on a final event that adds no token (EOS)
    text: str  # text delta, "" while held back
    finish_reason: str | None = None  # "stop" (EOS or stop string) | "length"
    usage: Usage | None = None


@dataclass
class KVState:
    """A sequence's decoding state: its KV cache and where the next token goes."""

    cache: DynamicCache
    next_positions: torch.Tensor  # [4]: text position, then the 3 M-RoPE axes, of the next token

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()


@dataclass(frozen=True)
class WarmStart:
    """What a request without payloads starts from: its images' grids and the cached prefix state."""

    grids: list[tuple[int, int, int]]
    state: KVState


@dataclass(frozen=True)
class Prompt:
    ids: torch.Tensor  # [L]
    embeds: torch.Tensor  # [1, L, hidden], image embeddings scattered in
    positions: torch.Tensor  # [4, 1, L]
    visual_mask: torch.Tensor  # [1, L] bool
    deepstack: list[torch.Tensor]  # per level [n_image_tokens, hidden]; empty if not Qwen3-VL
    prefix_len: int  # tokens up to the last image's <|vision_end|>: what every question about it shares
    grids: tuple[tuple[int, int, int], ...] = ()  # the images' grids, in order

    @property
    def suffix_len(self) -> int:
        return len(self.ids) - self.prefix_len


class DecoderEngine:
    def __init__(
        self,
        checkpoint: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        attn_implementation: str = "sdpa",
        max_new_tokens_limit: int = 4096,
        prefix_cache_bytes: int = 1 << 30,
    ):
        start = time.perf_counter()
        self.checkpoint = Checkpoint(checkpoint)
        self.family = self.checkpoint.family
        self.config = self.checkpoint.config
        self.dtype, self.device = dtype, torch.device(device)
        self.max_new_tokens_limit = max_new_tokens_limit
        self.text_model, self.lm_head = self._load(attn_implementation)
        self.merge_size: int = self.config.vision_config.spatial_merge_size
        self.prompts = PromptBuilder.from_pretrained(self.checkpoint.path, self.merge_size)
        self.eos_ids = _eos_ids(self.checkpoint.path, self.prompts.tokenizer)
        self.fingerprint = compute_fingerprint(self.checkpoint.path)
        self.deepstack_levels = len(getattr(self.config.vision_config, "deepstack_visual_indexes", None) or [])
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        # One forward at a time: concurrent forwards only oversubscribe the cores (each torch op
        # already uses all intra-op threads); concurrency comes from batching, not from threads.
        self.compute = threading.Lock()
        self.image_grids: OrderedDict[str, tuple[int, int, int]] = OrderedDict()  # image_id -> grid, for warm starts
        self.vision_end_id = self.prompts.tokenizer.convert_tokens_to_ids("<|vision_end|>")
        log.info("decoder %s loaded in %.2fs (%s, %s, fingerprint %s)", self.family.model_type,
                 time.perf_counter() - start, dtype, device, self.fingerprint)

    def _load(self, attn_implementation: str) -> tuple[nn.Module, nn.Linear]:
        text_config = self.config.text_config
        text_config._attn_implementation = attn_implementation
        names = self.checkpoint.language_names()
        head_names = {n: n for n in names if n == LM_HEAD}
        body_names = {n: m for n, m in names.items() if n != LM_HEAD}
        with no_init_weights():
            text_model = self.family.text_class._from_config(text_config, dtype=torch.float32)
        load_strict(text_model, self.checkpoint.read(body_names, self.dtype))
        # On the meta device: its weight is replaced just below, so never allocate or init it.
        lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False, device="meta")
        # A stored head wins even under a tied config, as in transformers' from_pretrained.
        if head_names:
            lm_head.weight = nn.Parameter(self.checkpoint.read(head_names, self.dtype)[LM_HEAD], requires_grad=False)
        elif self.config.tie_word_embeddings:
            lm_head.weight = text_model.embed_tokens.weight
        else:
            raise CheckpointError(f"{self.checkpoint.path}: tie_word_embeddings is false but {LM_HEAD} is missing")
        return text_model.eval().to(self.device), lm_head.eval().to(self.device)

    # ---- prompt --------------------------------------------------------------------------------

    def check_payload(self, payload: EmbeddingPayload) -> None:
        if payload.fingerprint != self.fingerprint:
            raise ModelMismatch(
                f"embeddings were made by model {payload.fingerprint}, this decoder serves {self.fingerprint}"
            )
        # grid divisible by the merge size, n_tokens matching it, hidden size, deepstack shapes
        validate_payload(payload, self.merge_size, self.config.text_config.hidden_size)
        if len(payload.deepstack) != self.deepstack_levels:
            raise CorruptPayload(f"payload has {len(payload.deepstack)} deepstack levels, model needs {self.deepstack_levels}")

    @torch.inference_mode()
    def build_prompt(self, messages: list[Message], payloads: list[EmbeddingPayload],
                     grids: list[tuple[int, int, int]] | None = None) -> Prompt:
        """The prompt's ids, embeddings and positions. Without payloads but with `grids` (a warm
        start), image positions keep placeholder embeddings: their KV comes from the prefix cache."""
        for payload in payloads:
            self.check_payload(payload)
        grids = [p.grid_thw for p in payloads] if payloads else list(grids or [])
        inputs: PromptInputs = self.prompts(messages, grids)
        ids = inputs.input_ids.to(self.device)
        mask = inputs.mm_token_type_ids.bool().to(self.device)
        embeds = self.text_model.embed_tokens(ids)[None]  # [1, L, hidden]
        if payloads:
            embeds[0, mask] = torch.cat([p.embeddings for p in payloads]).to(self.device, embeds.dtype)
        deepstack = [
            torch.cat([p.deepstack[level] for p in payloads]).to(self.device, embeds.dtype)
            for level in range(self.deepstack_levels if payloads else 0)
        ]
        rope, _ = mrope_positions(inputs.mm_token_type_ids, grids, self.merge_size)
        positions = torch.cat([torch.arange(len(ids))[None], rope])[:, None].to(self.device)  # [4, 1, L]
        return Prompt(ids, embeds, positions, mask[None], deepstack, self._prefix_len(inputs), tuple(grids))

    def _prefix_len(self, inputs: PromptInputs) -> int:
        image_positions = inputs.mm_token_type_ids.nonzero()
        if len(image_positions) == 0:
            return 0
        end = int(image_positions[-1]) + 1
        return end + 1 if end < len(inputs.input_ids) and inputs.input_ids[end] == self.vision_end_id else end

    def request_prompt(self, request: GenerationRequest) -> Prompt:
        grids = request.warm.grids if request.warm is not None else None
        return self.build_prompt(request.messages, request.payloads, grids)

    # ---- steps ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def warm_start(self, messages: list[Message], image_ids: tuple[str, ...]) -> WarmStart | None:
        """A start that needs no payload: the prompt's image prefix state is in the prefix cache.

        The returned state is a fork, so it stays valid even if the entry is evicted meanwhile.
        """
        grids = [self.image_grids.get(i) for i in image_ids]
        if not image_ids or None in grids:
            return None
        prompt = self.build_prompt(messages, [], grids)
        cached = self.prefix_cache.get(PrefixKey.of(self.fingerprint, image_ids, prompt.ids[: prompt.prefix_len].cpu()))
        return None if cached is None else WarmStart(grids, KVState(*cached))

    @torch.inference_mode()
    def prefill(self, prompt: Prompt, image_ids: tuple[str, ...] = (),
                warm: WarmStart | None = None) -> tuple[KVState, torch.Tensor]:
        """Run the prompt; return its state and the logits [vocab] of the next token.

        A prompt with images is prefilled in two chunks, the image prefix then the question's own
        tokens, whether or not the prefix state is cached, so a warm answer is computed exactly as
        a cold one. With `image_ids` the prefix state is looked up in / stored into the prefix cache.
        """
        if prompt.prefix_len == 0:
            return self._prefill_chunk(prompt, 0, len(prompt.ids), self._new_state(prompt))
        state = warm.state if warm is not None else self.prefix_state(prompt, image_ids)
        return self._prefill_chunk(prompt, prompt.prefix_len, len(prompt.ids), state)

    def prefix_state(self, prompt: Prompt, image_ids: tuple[str, ...] = ()) -> KVState:
        """The state after the prompt's image prefix: from the prefix cache, or prefilled (and stored)."""
        key = PrefixKey.of(self.fingerprint, image_ids, prompt.ids[: prompt.prefix_len].cpu()) if image_ids else None
        cached = self.prefix_cache.get(key) if key else None
        if cached is not None:
            return KVState(*cached)
        state, _ = self._prefill_chunk(prompt, 0, prompt.prefix_len, self._new_state(prompt))
        if key:
            self.prefix_cache.put(key, state.cache, state.next_positions)
            for img_id, grid in zip(image_ids, prompt.grids):
                self.image_grids[img_id] = grid
                self.image_grids.move_to_end(img_id)
            while len(self.image_grids) > MAX_REMEMBERED_IMAGES:
                self.image_grids.popitem(last=False)
        return state

    def _new_state(self, prompt: Prompt) -> KVState:
        return KVState(DynamicCache(config=self.config.text_config), prompt.positions[:, 0, 0])

    def _prefill_chunk(self, prompt: Prompt, start: int, end: int, state: KVState) -> tuple[KVState, torch.Tensor]:
        """Append prompt tokens [start, end) to `state`; logits [vocab] after the last of them."""
        extra = {}
        if prompt.deepstack and start == 0:  # every image token lies in the first chunk
            extra = {"visual_pos_masks": prompt.visual_mask[:, start:end], "deepstack_visual_embeds": prompt.deepstack}
        PREFILL_TOKENS.inc(end - start)
        logits = self._forward(prompt.embeds[:, start:end], prompt.positions[:, :, start:end], state.cache, **extra)
        return KVState(state.cache, prompt.positions[:, 0, end - 1] + 1), logits

    @torch.inference_mode()
    def decode_step(self, state: KVState, token_id: int) -> torch.Tensor:
        """Append one token to the sequence; return the logits [vocab] of the one after it."""
        embeds = self.text_model.embed_tokens(torch.tensor([[token_id]], device=self.device))
        logits = self._forward(embeds, state.next_positions.view(4, 1, 1), state.cache)
        state.next_positions = state.next_positions + 1
        return logits

    def _forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache: DynamicCache, **extra) -> torch.Tensor:
        # embeds [1, n, hidden], positions [4, 1, n] -> logits [vocab] after the last position
        total = cache.get_seq_length() + embeds.shape[1]
        attention_mask = torch.ones(1, total, dtype=torch.long, device=self.device)
        return self.forward_batch(embeds, positions, cache, attention_mask, **extra)[0]

    @torch.inference_mode()
    def forward_batch(self, embeds: torch.Tensor, positions: torch.Tensor, cache: DynamicCache,
                      attention_mask: torch.Tensor, **extra) -> torch.Tensor:
        """embeds [B, n, hidden], positions [4, B, n], attention_mask [B, past + n] -> logits [B, vocab]."""
        return self.lm_head(self.hidden_states(embeds, positions, cache, attention_mask, **extra)[:, -1]).float()

    @torch.inference_mode()
    def hidden_states(self, embeds: torch.Tensor, positions: torch.Tensor, cache: DynamicCache,
                      attention_mask: torch.Tensor, **extra) -> torch.Tensor:
        """The text model's last hidden states [B, n, hidden]; `cache` grows by n positions."""
        with self.compute:
            return self.text_model(
                inputs_embeds=embeds, position_ids=positions, past_key_values=cache,
                attention_mask=attention_mask.to(self.device), use_cache=True, **extra,
            ).last_hidden_state

    # ---- generation ----------------------------------------------------------------------------

    def generate(self, request: GenerationRequest, cancelled: Callable[[], bool] = lambda: False,
                 ) -> Iterator[TokenEvent]:
        """Stream tokens for one request. Greedy unless a temperature is given.

        `cancelled` is polled between tokens (the client went away): generation then simply stops.
        The final event carries `usage`.
        """
        params = request.sampling.validate(self.max_new_tokens_limit)
        prompt = self.request_prompt(request)
        sampler = Sampler(params)
        detok = Detokenizer(self.prompts.decode, params.stop)
        state, logits = self.prefill(prompt, request.image_ids, request.warm)
        usage = Usage(len(prompt.ids), int(prompt.visual_mask.sum()), 0)
        for step in range(params.max_new_tokens):
            if cancelled():
                return
            token = sampler(logits)
            if token in self.eos_ids:
                yield TokenEvent(None, detok.flush(), "stop", usage)
                return
            usage = dataclasses.replace(usage, completion_tokens=step + 1)
            delta = detok.add(token)
            if detok.stopped:
                yield TokenEvent(token, delta, "stop", usage)
                return
            if step == params.max_new_tokens - 1:
                yield TokenEvent(token, delta + detok.flush(), "length", usage)
                return
            yield TokenEvent(token, delta)
            logits = self.decode_step(state, token)


def _eos_ids(path: Path, tokenizer) -> frozenset[int]:
    try:
        eos = GenerationConfig.from_pretrained(path, local_files_only=True).eos_token_id
    except OSError:
        eos = None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise CheckpointError(f"{path}: no eos_token_id in generation_config.json or the tokenizer")
    return frozenset([eos] if isinstance(eos, int) else eos)
