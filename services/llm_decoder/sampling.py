"""Next-token choice for a whole step's rows at once (greedy, temperature, top-k, top-p, seed).

Greedy rows take one batched argmax; sampled rows are scaled, truncated and softmaxed together, and
each draws from its own generator (a seeded request is reproducible whatever it is batched with).
The chosen ids reach the host in one transfer per step.
"""

from __future__ import annotations

import math

import torch

from shared.sampling import SamplingParams

__all__ = ["Sampler", "SamplingParams", "sample"]


class Sampler:
    """One sequence's sampling settings and private random generator (on the model's device)."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params
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


def sample(logits: torch.Tensor, samplers: list[Sampler]) -> list[int]:
    """logits [R, vocab] -> one token id per row."""
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


def _probabilities(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[R, vocab] logits -> probabilities after temperature, top-k and top-p, per row's settings."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]
    logits = logits / temperature
    top_k = torch.tensor([p.top_k or logits.shape[1] for p in params], device=device)
    if (top_k < logits.shape[1]).any():
        kth = logits.sort(-1, descending=True).values.gather(1, (top_k.clamp(max=logits.shape[1]) - 1)[:, None])
        logits = logits.masked_fill(logits < kth, -math.inf)
    top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
    if (top_p < 1.0).any():
        sorted_logits, order = logits.sort(-1, descending=True)
        mass = sorted_logits.softmax(-1)
        # drop a token once the mass before it already reaches top_p (the first is always kept)
        drop = (mass.cumsum(-1) - mass) >= top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, -math.inf))
    return torch.softmax(logits, dim=-1)
