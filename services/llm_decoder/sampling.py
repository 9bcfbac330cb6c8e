"""Sampling parameters and next-token choice (greedy, temperature, top-k, top-p, seed)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from vlsplit.shared.errors import InvalidRequest, TooLarge


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 mean no truncation."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, max_new_tokens_limit: int) -> "SamplingParams":
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        if self.max_new_tokens > max_new_tokens_limit:
            raise TooLarge(f"max_new_tokens {self.max_new_tokens} exceeds the limit {max_new_tokens_limit}")
        _check(math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be finite and >= 0")
        _check(math.isfinite(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be >= 0")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty")
        _check(len(self.stop) <= 16, "at most 16 stop strings")
        return self


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequest(message)


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
