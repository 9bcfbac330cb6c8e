"""Sampling parameters: plain data, validated once; torch-free so the gateway can check them early."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import InvalidRequest, TooLarge

GREEDY_BELOW = 1e-5  # a temperature under this is greedy decoding (dividing by it would overflow)


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 (or below 1e-5) means greedy; top_k 0 and top_p 1 mean no truncation."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

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


def sampling_from_pb(pb, default_max_new_tokens: int) -> SamplingParams:
    """From a `vlsplit.v1.SamplingParams` message; unset optional fields take the defaults."""
    return SamplingParams(
        max_new_tokens=pb.max_new_tokens if pb.HasField("max_new_tokens") else default_max_new_tokens,
        temperature=pb.temperature if pb.HasField("temperature") else 0.0,
        top_p=pb.top_p if pb.HasField("top_p") else 1.0,
        top_k=pb.top_k if pb.HasField("top_k") else 0,
        seed=pb.seed if pb.HasField("seed") else None,
        stop=tuple(pb.stop),
    )
