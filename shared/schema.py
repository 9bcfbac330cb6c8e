"""The request schema both sides use: chat roles, content-part kinds, the question-to-message shape and
the sampling message. Torch-free and server-free (the standard library and the generated stubs only):
the client package (SDK, client CLI) imports it, and so do the gateway and the decoder.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from vlsplit.v1 import common_pb2

ROLES = ("system", "user", "assistant")
# OpenAI's roles -> ours: "developer" is OpenAI's newer name for the system prompt.
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MEDIA_TYPES = ("image", "video")

# {"role": str, "content": str | [{"type": "image" | "video"} | {"type": "text", "text": str}]}
Message = dict[str, Any]

# The sampling controls both command lines take: (flag name, type, default, help). Defaults are the
# command line's; unset SamplingParams fields take the server's.
SAMPLING_FLAGS: tuple[tuple[str, type, Any, str | None], ...] = (
    ("max_new_tokens", int, 64, None),
    ("temperature", float, 0.0, "0 = greedy (default)"),
    ("top_p", float, 1.0, None),
    ("top_k", int, 0, None),
    ("seed", int, None, None),
)
SAMPLING_NUMBERS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "presence_penalty",
                    "frequency_penalty", "repetition_penalty")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """--max-new-tokens, --temperature, --top-p, --top-k, --seed and --stop (repeatable), for both command lines."""
    for name, kind, default, text in SAMPLING_FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=text)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def check_role(index: int, role: str) -> None:
    """ValueError naming the message and the roles there are (servers raise their own typed error from it)."""
    if role not in ROLES:
        raise ValueError(f"message {index}: role must be one of {', '.join(ROLES)}, not {role!r}")


def question_messages(question: str, n_images: int = 1) -> list[Message]:
    """One user turn: `n_images` images, then the question (Ask, AskMany, Classify, local-ask)."""
    content: list[dict[str, str]] = [{"type": "image"} for _ in range(n_images)]
    return [{"role": "user", "content": content + [{"type": "text", "text": question}]}]


def media_count(messages: Sequence[Mapping[str, Any]]) -> int:
    """The image and video parts of a conversation."""
    return sum(isinstance(part, dict) and part.get("type") in MEDIA_TYPES
               for m in messages for part in (m["content"] if isinstance(m.get("content"), list) else []))


def sampling_params(max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                    top_k: int | None = None, seed: int | None = None, stop: Sequence[str] = (),
                    presence_penalty: float | None = None, frequency_penalty: float | None = None,
                    repetition_penalty: float | None = None, logprobs: bool = False, top_logprobs: int = 0,
                    json_schema: str | None = None, choices: Sequence[str] | None = None,
                    ) -> common_pb2.SamplingParams:
    """The wire's SamplingParams; unset = the server's defaults (greedy, its max_new_tokens).
    `json_schema` is the schema's JSON text."""
    pb = common_pb2.SamplingParams(stop=list(stop), logprobs=logprobs, top_logprobs=top_logprobs)
    values = dict(zip(SAMPLING_NUMBERS, (max_new_tokens, temperature, top_p, top_k, seed, presence_penalty,
                                         frequency_penalty, repetition_penalty)))
    for name, value in values.items():
        if value is not None:
            setattr(pb, name, value)
    if json_schema is not None:
        pb.response_format.json_schema = json_schema
    elif choices is not None:
        pb.response_format.choices.choices.extend(choices)
    return pb
