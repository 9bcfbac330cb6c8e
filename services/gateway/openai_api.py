"""OpenAI chat-completions requests -> ChatRequest protos, and ChatResponses -> OpenAI JSON.

What is taken: messages (system/developer, user with text and image_url parts, assistant), n,
max_tokens / max_completion_tokens, temperature, top_p, seed, stop, presence_penalty,
frequency_penalty, logprobs, top_logprobs, response_format (text, json_object, json_schema) and
stream + stream_options.include_usage; plus vLLM's extras top_k, repetition_penalty and
guided_choice (also as response_format {"type": "choice", "choices": [...]}). Unset temperature is
greedy, as in the gRPC API (OpenAI's own default is 1). Every response also carries a `vlsplit`
object: image ids, cache hit/miss and timings.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.errors import InvalidRequest
from vlsplit.sdk import sampling
from vlsplit.v1 import common_pb2, gateway_pb2, llm_decoder_pb2

from .remote import ImageUrls

FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ImageUrl(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | None = None


class Message(BaseModel):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] = Field(min_length=1)
    n: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    guided_choice: list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[Any] | None = None  # refused: not supported
    functions: list[Any] | None = None  # refused: not supported


async def chat_request(body: ChatCompletionRequest, urls: ImageUrls) -> gateway_pb2.ChatRequest:
    if body.tools or body.functions:
        raise InvalidRequest("tools and functions are not supported by this server")
    request = gateway_pb2.ChatRequest(n=body.n, sampling=_sampling(body))
    for i, message in enumerate(body.messages):
        role = ROLES.get(message.role)
        if role is None:
            raise InvalidRequest(f"messages[{i}].role {message.role!r} is not supported "
                                 f"(one of: {', '.join(ROLES)})")
        turn = request.messages.add(role=role)
        parts = [ContentPart(type="text", text=message.content)] if isinstance(message.content, str) \
            else message.content or []
        for part in parts:
            if part.type == "text":
                turn.content.add(text=part.text or "")
            elif part.image_url is None:
                raise InvalidRequest(f"messages[{i}]: an image_url part needs image_url.url")
            else:
                turn.content.add(image=await urls.image_ref(part.image_url.url))
    return request


def _sampling(body: ChatCompletionRequest) -> common_pb2.SamplingParams:
    out = sampling(max_new_tokens=body.max_completion_tokens or body.max_tokens, temperature=body.temperature,
                   top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                   stop=[body.stop] if isinstance(body.stop, str) else body.stop or [],
                   presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                   repetition_penalty=body.repetition_penalty, logprobs=body.logprobs,
                   top_logprobs=body.top_logprobs or 0)
    fmt = _response_format(body)
    if fmt is not None:
        out.response_format.CopyFrom(fmt)
    return out


def _response_format(body: ChatCompletionRequest) -> common_pb2.ResponseFormat | None:
    fmt = body.response_format or {}
    kind = fmt.get("type", "text")
    choices = body.guided_choice if body.guided_choice is not None else fmt.get("choices") if kind == "choice" else None
    if choices is not None:
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices) or not choices:
            raise InvalidRequest("choices must be a non-empty list of strings")
        return common_pb2.ResponseFormat(choices=common_pb2.ChoiceList(choices=choices))
    if kind == "text":
        return None
    if kind == "json_object":
        return common_pb2.ResponseFormat(json_object=True)
    if kind == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise InvalidRequest("response_format.json_schema.schema must be a JSON schema object")
        return common_pb2.ResponseFormat(json_schema=json.dumps(schema))
    raise InvalidRequest(f"response_format type {kind!r} is not supported (text, json_object, json_schema, choice)")


class Completion:
    """The ids and clock of one chat completion, and its JSON shapes."""

    def __init__(self, model: str):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model

    def response(self, final: gateway_pb2.ChatResponse) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                             "logprobs": _logprobs(c.logprobs) if c.logprobs else None,
                             "finish_reason": FINISH.get(c.finish_reason)} for c in final.choices],
                "usage": usage(final.usage), "vlsplit": stats(final)}

    def chunk(self, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def delta(self, reply: llm_decoder_pb2.GenerateResponse, first: bool) -> dict:
        """One answer's stream delta (`first`: that answer's first chunk, which names the role)."""
        delta = {"role": "assistant", "content": reply.text} if first else {"content": reply.text}
        return {"index": reply.index, "delta": delta,
                "logprobs": _logprobs(reply.logprobs) if reply.logprobs else None,
                "finish_reason": FINISH.get(reply.finish_reason)}


def usage(pb: common_pb2.Usage) -> dict:
    return {"prompt_tokens": pb.prompt_tokens, "completion_tokens": pb.completion_tokens,
            "total_tokens": pb.prompt_tokens + pb.completion_tokens}


def stats(final: gateway_pb2.ChatResponse) -> dict:
    t = final.timings
    return {"image_ids": list(final.image_ids), "cache": "hit" if final.cache == gateway_pb2.CACHE_STATUS_HIT else "miss",
            "encode_ms": round(t.encode_ms, 2), "ttft_ms": round(t.ttft_ms, 2), "total_ms": round(t.total_ms, 2),
            "token_ids": [list(c.token_ids) for c in final.choices]}


def _logprobs(entries) -> dict:
    return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": list(e.bytes),
                         "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)}
                                          for t in e.top]} for e in entries]}
