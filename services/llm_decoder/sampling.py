"""Next-token choice (greedy, temperature, top-k, top-p, seed) for `SamplingParams`."""

from __future__ import annotations

import math

import torch

from vlsplit.shared.sampling import SamplingParams

__all__ = ["Sampler", "SamplingParams"]


class Sampler:
    """Chooses tokens for one sequence; owns its RNG so concurrent requests never share state."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [vocab] -> token id."""
        if self.params.greedy:
            return int(logits.argmax())
        probs = torch.softmax(self._truncate(logits.float() / self.params.temperature), dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def _truncate(self, logits: torch.Tensor) -> torch.Tensor:
        if self.params.top_k:
            kth = torch.topk(logits, min(self.params.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if self.params.top_p < 1.0:
            sorted_logits, order = logits.sort(descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            # drop tokens once the mass before them already reaches top_p (always keep the first)
            drop = cumulative - sorted_logits.softmax(-1) >= self.params.top_p
            logits = logits.scatter(0, order[drop], -math.inf)
        return logits
