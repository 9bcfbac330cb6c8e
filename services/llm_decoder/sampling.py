"""Next-token choice for a whole step's rows at once.

    raw logits [R, vocab] -> penalties (repetition, presence, frequency) -> grammar mask
    -> greedy argmax, or temperature / top-k / top-p and a draw from the row's own generator

Greedy rows take one batched argmax; sampled rows are scaled, truncated and softmaxed together, and
each draws from its own generator (a seeded request is reproducible whatever it is batched with).
The chosen ids reach the host in one transfer per step. Log-probabilities (when asked for) are those
of the raw logits: the model's distribution, before any sampling control.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from shared.sampling import SamplingParams

__all__ = ["Logprobs", "Sampler", "SamplingParams", "sample", "token_logprobs"]


class History(Protocol):
    """What penalties look at: a sequence's tokens (prompt, then answer) and its prompt."""

    tokens: list[int]
    prompt: object


@dataclass(frozen=True)
class Logprobs:
    logprob: float  # of the chosen token
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


class Sampler:
    """One sequence's sampling settings, private random generator (on the model's device) and, with a
    response format, its grammar matcher."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu", matcher=None):
        self.params = params
        self.matcher = matcher
        self.seen: Seen | None = None  # the penalties' view of the history, kept up to date incrementally
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [vocab] -> token id (one row; the engine uses `sample` for whole steps)."""
        return sample(logits[None], [self])[0]


def sample(logits: torch.Tensor, samplers: list[Sampler], histories: list[History] | None = None,
           mask=None) -> list[int]:
    """logits [R, vocab] -> one token id per row. `histories` (per row) feed the penalties; `mask`
    (a grammar.GrammarMask) constrains the rows whose sampler has a matcher."""
    if histories is not None and any(s.params.penalized for s in samplers):
        logits = _penalize(logits, samplers, histories)
    if mask is not None and any(s.matcher is not None for s in samplers):
        logits = mask.apply(logits, [s.matcher for s in samplers])
    chosen = logits.argmax(-1)
    hot = [i for i, s in enumerate(samplers) if not s.params.greedy]
    if hot:
        index = torch.tensor(hot, device=logits.device)
        probs = _probabilities(logits[index].float(), [samplers[i].params for i in hot])
        broken = ~torch.isfinite(probs).all(-1, keepdim=True)  # e.g. all-inf logits: take the argmax
        probs = torch.where(broken, torch.nn.functional.one_hot(chosen[index], probs.shape[-1]).to(probs), probs)
        draws = torch.stack([torch.multinomial(p, 1, generator=samplers[i].generator)[0]
                             for p, i in zip(probs, hot)])
        chosen = chosen.index_copy(0, index, draws)
    return chosen.tolist()


class Seen:
    """A sequence's tokens as the penalties need them, updated with the tokens added since the last step
    (not rebuilt from the whole history every step): which ids occurred at all (prompt + answer), and
    how often each occurred in the answer."""

    def __init__(self, vocab: int, device: torch.device):
        self.upto = 0  # tokens of the history already counted
        self.any = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.answer_counts = torch.zeros(vocab, dtype=torch.float32, device=device)

    def update(self, tokens: list[int], prompt_len: int) -> None:
        new = tokens[self.upto:]
        if new:
            ids = torch.tensor(new, device=self.any.device)
            self.any[ids] = True
            answer = ids[max(0, prompt_len - self.upto):]
            self.answer_counts.index_add_(0, answer, torch.ones(len(answer), device=self.any.device))
            self.upto = len(tokens)


def _probabilities(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[R, vocab] logits -> probabilities after temperature, top-k and top-p, per row's settings."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]
    logits = logits / temperature
    top_k = torch.tensor([p.top_k or logits.shape[1] for p in params], device=device)
    if (top_k < logits.shape[1]).any():  # the k largest of the largest k_max, not a full-vocabulary sort
        k = top_k.clamp(max=logits.shape[1])
        kth = logits.topk(int(k.max()), -1).values.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, -math.inf)
    top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
    if (top_p < 1.0).any():
        sorted_logits, order = logits.sort(-1, descending=True)
        mass = sorted_logits.softmax(-1)
        # drop a token once the mass before it already reaches top_p (the first is always kept)
        drop = (mass.cumsum(-1) - mass) >= top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, -math.inf))
    return torch.softmax(logits, dim=-1)


def _penalize(logits: torch.Tensor, samplers: list[Sampler], histories: list[History]) -> torch.Tensor:
    """Hugging Face's repetition penalty over prompt + answer, then OpenAI's presence and frequency
    penalties over the answer, on the rows that ask for them."""
    logits = logits.clone()
    for row, (sampler, seq) in enumerate(zip(samplers, histories)):
        p = sampler.params
        if not p.penalized:
            continue
        x = logits[row]
        if sampler.seen is None:
            sampler.seen = Seen(x.shape[0], x.device)
        seen = sampler.seen
        seen.update(seq.tokens, len(seq.prompt))
        if p.repetition_penalty != 1.0:
            penalized = torch.where(x < 0, x * p.repetition_penalty, x / p.repetition_penalty)
            x.copy_(torch.where(seen.any, penalized, x))
        if len(seq.tokens) > len(seq.prompt) and (p.presence_penalty or p.frequency_penalty):
            counts = seen.answer_counts.to(x.dtype)
            x -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(x.dtype)
    return logits


def token_logprobs(logits: torch.Tensor, samplers: list[Sampler], tokens: list[int]) -> list[Logprobs | None]:
    """Per row that asked for logprobs: the chosen token's and the top_logprobs alternatives' (raw logits)."""
    wanted = [i for i, s in enumerate(samplers) if s.params.logprobs]
    out: list[Logprobs | None] = [None] * len(samplers)
    if not wanted:
        return out
    index = torch.tensor(wanted, device=logits.device)
    logprobs = torch.log_softmax(logits[index].float(), -1)
    chosen = logprobs.gather(1, torch.tensor([tokens[i] for i in wanted], device=logits.device)[:, None])[:, 0].tolist()
    k = max(samplers[i].params.top_logprobs for i in wanted)
    top = logprobs.topk(k, -1) if k else None
    for j, i in enumerate(wanted):
        n = samplers[i].params.top_logprobs
        alternatives = tuple(zip(top.indices[j, :n].tolist(), top.values[j, :n].tolist())) if n else ()
        out[i] = Logprobs(chosen[j], alternatives)
    return out
