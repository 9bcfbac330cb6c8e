"""Sampling parameters: plain data, validated once; torch-free so the gateway can check them early."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from .errors import InvalidRequest, TooLarge

GREEDY_BELOW = 1e-5  # a temperature under this is greedy decoding (dividing by it would overflow)
MAX_TOP_LOGPROBS = 20  # OpenAI's bound


@dataclass(frozen=True)
class ResponseFormat:
    """A grammar the answer must follow: exactly one of a JSON schema (JSON text), any JSON object,
    or one of `choices`. The decoder compiles it (services/llm_decoder/grammar.py)."""

    json_schema: str = ""
    json_object: bool = False
    choices: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.json_schema or self.json_object or self.choices)


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 (or below 1e-5) means greedy; top_k 0 and top_p 1 mean no truncation."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    presence_penalty: float = 0.0  # minus this on every token already generated
    frequency_penalty: float = 0.0  # minus this per time a token was generated
    repetition_penalty: float = 1.0  # over prompt + answer tokens: positive logits / p, negative * p
    logprobs: bool = False
    top_logprobs: int = 0
    response_format: ResponseFormat = ResponseFormat()

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def validate(self, max_new_tokens_limit: int, max_stop: int | None = None) -> "SamplingParams":
        """Checks every field; `max_stop` bounds the stop strings (the caller's VLSPLIT_MAX_STOP; None: the
        caller checks the count itself, as the decoder's intake does with its max_stop and max_stop_chars)."""
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        if self.max_new_tokens > max_new_tokens_limit:
            raise TooLarge(f"max_new_tokens {self.max_new_tokens} exceeds the limit {max_new_tokens_limit}")
        _check(math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be finite and >= 0")
        _check(math.isfinite(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be >= 0")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty")
        if max_stop is not None and len(self.stop) > max_stop:
            raise TooLarge(f"{len(self.stop)} stop strings; the limit is {max_stop} (VLSPLIT_MAX_STOP)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(math.isfinite(value) and -2 <= value <= 2, f"{name} must be in [-2, 2]")
        _check(math.isfinite(self.repetition_penalty) and 0 < self.repetition_penalty <= 2,
               "repetition_penalty must be in (0, 2]")
        _check(0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}")
        _check(not self.top_logprobs or self.logprobs, "top_logprobs needs logprobs")
        fmt = self.response_format
        _check(sum(map(bool, (fmt.json_schema, fmt.json_object, fmt.choices))) <= 1,
               "response_format takes one of json_schema, json_object, choices")
        _check(all(isinstance(c, str) and c for c in fmt.choices), "response_format choices must be non-empty")
        _check(len(set(fmt.choices)) == len(fmt.choices), "response_format choices must be distinct")
        if fmt.json_schema:
            try:
                schema = json.loads(fmt.json_schema)
            except ValueError as exc:
                raise InvalidRequest(f"response_format json_schema is not JSON: {exc}") from None
            _check(isinstance(schema, dict), "response_format json_schema must be a JSON object")
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
        presence_penalty=pb.presence_penalty if pb.HasField("presence_penalty") else 0.0,
        frequency_penalty=pb.frequency_penalty if pb.HasField("frequency_penalty") else 0.0,
        repetition_penalty=pb.repetition_penalty if pb.HasField("repetition_penalty") else 1.0,
        logprobs=pb.logprobs,
        top_logprobs=pb.top_logprobs,
        response_format=_format_from_pb(pb.response_format) if pb.HasField("response_format") else ResponseFormat(),
    )


def _format_from_pb(pb) -> ResponseFormat:
    kind = pb.WhichOneof("kind")
    if kind == "json_schema":
        return ResponseFormat(json_schema=pb.json_schema)
    if kind == "choices":
        return ResponseFormat(choices=tuple(pb.choices.choices))
    return ResponseFormat(json_object=kind == "json_object" and pb.json_object)
