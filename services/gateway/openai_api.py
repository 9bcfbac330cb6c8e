"""OpenAI chat-completions requests -> ChatRequest protos, and ChatResponses -> OpenAI JSON.

What is taken: messages (system/developer, user with text, image_url and video_url parts, assistant), n,
max_tokens / max_completion_tokens, temperature, top_p, seed, stop, presence_penalty,
frequency_penalty, logprobs, top_logprobs, response_format (text, json_object, json_schema) and
stream + stream_options.include_usage; plus vLLM's extras top_k, repetition_penalty and
guided_choice (also as response_format {"type": "choice", "choices": [...]}). Nothing else: any other
field (tools, functions, logit_bias, audio, user, ...) is refused with a 400 naming it, so no option a
client relies on is silently dropped. Unset temperature is greedy, as in the gRPC API (OpenAI's own
default is 1). Every response also carries a `vlsplit`
object: image ids, cache hit/miss and timings.

A `video_url` part is a clip, as vLLM and SGLang take it: {"type": "video_url", "video_url": {"url": ...}},
the url a data: URL, vlsplit://<id> (POST /v1/videos) or a remote https:// URL (the image URLs' guards),
plus vlsplit's optional sampling fields beside the url: fps, min_frames, max_frames, min_pixels,
max_pixels (unset = the model's defaults; the encoder bounds each and names its setting).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.errors import InvalidRequest
from shared.image_ids import VideoParams
from shared.schema import OPENAI_ROLES, sampling_params
from vlsplit.v1 import common_pb2, gateway_pb2, llm_decoder_pb2

FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length"}
# gateway_pb2.CacheStatus as the responses' "vlsplit" object says it ("none": the request had no image)
CACHE = {gateway_pb2.CACHE_STATUS_HIT: "hit", gateway_pb2.CACHE_STATUS_MISS: "miss",
         gateway_pb2.CACHE_STATUS_UNSPECIFIED: "none"}


class Strict(BaseModel):
    """Every request body: no field we do not honour (a client's typo or an unsupported feature is a 400
    naming it, never silently ignored), JSON types as sent (no "1" for 1), no NaN or infinity."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ImageUrl(Strict):
    url: str = Field(min_length=1)
    detail: Literal["auto"] | None = None  # the processor's own resolution; "low"/"high" are not offered


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


UINT32 = 2**32 - 1


class VideoSampling(Strict):
    """How a clip is sampled into frames (ImageRef.video); unset = the model's default."""

    fps: float | None = Field(None, ge=0, le=1e6)
    min_frames: int | None = Field(None, ge=0, le=UINT32)
    max_frames: int | None = Field(None, ge=0, le=UINT32)
    min_pixels: int | None = Field(None, ge=0, le=2**63 - 1)
    max_pixels: int | None = Field(None, ge=0, le=2**63 - 1)

    def params(self) -> VideoParams:
        return VideoParams(fps=self.fps or 0.0, min_frames=self.min_frames or 0, max_frames=self.max_frames or 0,
                           min_pixels=self.min_pixels or 0, max_pixels=self.max_pixels or 0)


class VideoUrl(VideoSampling):
    url: str = Field(min_length=1)


class VideoPart(Strict):
    type: Literal["video_url"]
    video_url: VideoUrl


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]
MediaPart = ImagePart | VideoPart


class Message(Strict):
    role: Literal[tuple(OPENAI_ROLES)]  # type: ignore[valid-type]  # the keys, as a Literal for the schema
    content: str | list[ContentPart]


class StreamOptions(Strict):
    include_usage: bool = False


class TextFormat(Strict):
    type: Literal["text"]


class JsonObjectFormat(Strict):
    type: Literal["json_object"]


class JsonSchema(Strict):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # the answer always follows the schema (a grammar mask), strict or not


class JsonSchemaFormat(Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchema


class ChoiceFormat(Strict):
    type: Literal["choice"]
    choices: list[str] = Field(min_length=1)


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat | ChoiceFormat,
                           Field(discriminator="type")]
INT32 = 2**31 - 1


class ChatSampling(Strict):
    """What a chat completion and a batch of them (POST /v1/chat/completions/batch) share: the model and
    the sampling, response format and logprobs fields."""

    model: str
    max_tokens: int | None = Field(None, ge=1, le=INT32)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=INT32)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)


class ChatCompletionRequest(ChatSampling):
    messages: list[Message] = Field(min_length=1)
    n: int = Field(1, ge=1, le=INT32)
    stream: bool = False
    stream_options: StreamOptions | None = None


class BatchChatCompletionRequest(ChatSampling):
    """vLLM's POST /v1/chat/completions/batch body: a chat completion request whose `messages` is a list of
    conversations (each a list of messages), all sampled with the one set of parameters. As in vLLM, n is 1
    and stream is false (the answer is one JSON body, one choice per conversation)."""

    messages: list[Annotated[list[Message], Field(min_length=1)]] = Field(min_length=1)
    n: Literal[1] = 1
    stream: Literal[False] = False

    def conversations(self) -> list[ChatCompletionRequest]:
        """Each conversation as the chat completion request it stands for (already validated)."""
        shared = {name: getattr(self, name) for name in ChatSampling.model_fields}
        return [ChatCompletionRequest.model_construct(**shared, messages=messages) for messages in self.messages]

    def shared_image(self) -> tuple[str, list[str]] | None:
        """(image URL, questions) when every conversation is one user turn [image, text] about the same image
        URL (AskMany's shape: one decoder request, the image's prefix shared); else None."""
        url, questions = None, []
        for messages in self.messages:
            if len(messages) != 1 or messages[0].role != "user" or isinstance(messages[0].content, str) \
                    or len(messages[0].content) != 2:
                return None
            image, text = messages[0].content
            if not isinstance(image, ImagePart) or not isinstance(text, TextPart) or not text.text.strip() \
                    or url not in (None, image.image_url.url):
                return None
            url = image.image_url.url
            questions.append(text.text)
        assert url is not None
        return url, questions


class Check(Strict):
    question: str
    labels: list[str] = Field(min_length=1)


class ClassifyRequest(Strict):
    """`image`: an image URL; or `video`: a clip's URL and its sampling (exactly one of the two)."""

    image: str | None = Field(None, min_length=1)
    video: VideoUrl | None = None
    checks: list[Check] = Field(min_length=1)

    def media(self) -> tuple[str, VideoParams | None]:
        """(url, sampling): the sampling is None for an image."""
        if (self.image is None) == (self.video is None):
            raise InvalidRequest("give exactly one of image (an image URL) and video ({\"url\": a clip URL, ...})")
        if self.video is not None:
            return self.video.url, self.video.params()
        assert self.image is not None
        return self.image, None


def turns(body: ChatCompletionRequest) -> list[tuple[str, list[TextPart | ImagePart | VideoPart]]]:
    """The messages as (gateway role, parts); a string content is one text part."""
    return [(OPENAI_ROLES[m.role], [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else m.content)
            for m in body.messages]


def media_parts(body: ChatCompletionRequest) -> list[MediaPart]:
    """The image and video parts, in order of appearance."""
    return [part for _, parts in turns(body) for part in parts if isinstance(part, (ImagePart, VideoPart))]


def media_url(part: MediaPart) -> tuple[str, VideoParams | None]:
    """(url, sampling) of a part: the sampling is None for an image."""
    if isinstance(part, VideoPart):
        return part.video_url.url, part.video_url.params()
    return part.image_url.url, None


def image_urls(body: ChatCompletionRequest) -> list[str]:
    """The URLs of the image and video parts, in order."""
    return [media_url(part)[0] for part in media_parts(body)]


def chat_request(body: ChatCompletionRequest, images: list[gateway_pb2.ImageRef]) -> gateway_pb2.ChatRequest:
    """The ChatRequest of `body`, its image and video parts replaced in order by `images` (fetched by the
    caller; a clip's ref carries its sampling)."""
    request = gateway_pb2.ChatRequest(n=body.n, sampling=_sampling(body))
    refs = iter(images)
    for role, parts in turns(body):
        turn = request.messages.add(role=role)
        for part in parts:
            if isinstance(part, TextPart):
                turn.content.add(text=part.text)
            else:
                turn.content.add(image=next(refs))
    return request


def ask_many_request(body: BatchChatCompletionRequest, image: gateway_pb2.ImageRef,
                     questions: list[str]) -> gateway_pb2.AskManyRequest:
    """A shared-image batch as the gRPC AskMany request it is (`image`: fetched by the caller)."""
    return gateway_pb2.AskManyRequest(image=image, questions=questions, sampling=_sampling(body))


def _sampling(body: ChatSampling) -> common_pb2.SamplingParams:
    out = sampling_params(max_new_tokens=body.max_completion_tokens or body.max_tokens, temperature=body.temperature,
                   top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                   stop=[body.stop] if isinstance(body.stop, str) else body.stop or [],
                   presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                   repetition_penalty=body.repetition_penalty, logprobs=body.logprobs,
                   top_logprobs=body.top_logprobs or 0)
    fmt = _response_format(body)
    if fmt is not None:
        out.response_format.CopyFrom(fmt)
    return out


def _response_format(body: ChatSampling) -> common_pb2.ResponseFormat | None:
    fmt = body.response_format
    if body.guided_choice is not None and fmt is not None and not isinstance(fmt, TextFormat):
        raise InvalidRequest("guided_choice and response_format cannot both be set")
    choices = body.guided_choice if body.guided_choice is not None else \
        fmt.choices if isinstance(fmt, ChoiceFormat) else None
    if choices is not None:
        return common_pb2.ResponseFormat(choices=common_pb2.ChoiceList(choices=choices))
    if isinstance(fmt, JsonObjectFormat):
        return common_pb2.ResponseFormat(json_object=True)
    if isinstance(fmt, JsonSchemaFormat):
        return common_pb2.ResponseFormat(json_schema=json.dumps(fmt.json_schema.schema_))
    return None


class Completion:
    """The ids and clock of one chat completion, and its JSON shapes."""

    def __init__(self, model: str, prefix: str = "chatcmpl-"):
        self.id, self.created, self.model = f"{prefix}{uuid.uuid4().hex}", int(time.time()), model

    def response(self, final: gateway_pb2.ChatResponse) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                             "logprobs": _logprobs(c.logprobs) if c.logprobs else None,
                             "finish_reason": FINISH.get(c.finish_reason)} for c in final.choices],
                "usage": usage(final.usage), "vlsplit": stats(final)}

    def batch_response(self, finals: list[gateway_pb2.Answer | gateway_pb2.ChatResponse], shared_prefix: bool) -> dict:
        """vLLM's batch answer: one chat.completion whose choice i answers conversation i, usage summed.
        `finals`: AskMany's answers (shared image) or each conversation's ChatResponse (n=1)."""
        choices, token_ids, image_ids, cache = [], [], [], []
        prompt_tokens = completion_tokens = 0
        for index, final in enumerate(finals):
            if isinstance(final, gateway_pb2.Answer):
                one, images = final, [final.image_id]
            else:
                [one], images = final.choices, list(final.image_ids)
            choices.append({"index": index, "message": {"role": "assistant", "content": one.text},
                            "logprobs": _logprobs(one.logprobs) if one.logprobs else None,
                            "finish_reason": FINISH.get(one.finish_reason)})
            token_ids.append(list(one.token_ids))
            image_ids.append(images)
            cache.append(CACHE[final.cache])
            prompt_tokens += final.usage.prompt_tokens
            completion_tokens += final.usage.completion_tokens
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
                "vlsplit": {"shared_prefix": shared_prefix, "image_ids": image_ids, "cache": cache,
                            "token_ids": token_ids}}

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
    return {"image_ids": list(final.image_ids), "cache": CACHE[final.cache],
            "encode_ms": round(t.encode_ms, 2), "ttft_ms": round(t.ttft_ms, 2), "total_ms": round(t.total_ms, 2),
            "token_ids": [list(c.token_ids) for c in final.choices]}


def _logprobs(entries) -> dict:
    return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": list(e.bytes),
                         "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)}
                                          for t in e.top]} for e in entries]}
