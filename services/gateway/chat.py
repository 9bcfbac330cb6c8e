"""Chat: a conversation (system prompt, user turns with images anywhere, assistant turns) to the
decoder's messages plus the images to fetch, and `n` answers streamed back into one ChatResponse.
Used by the gRPC Chat RPCs and the OpenAI-compatible HTTP API alike."""

from __future__ import annotations

import hashlib
import time
from typing import Awaitable, Callable

from shared.config import GatewayConfig
from shared.errors import InvalidRequest, TooLarge
from shared.schema import check_role
from vlsplit.v1 import common_pb2, gateway_pb2, llm_decoder_pb2

from .pipeline import ImageSource



async def conversation(turns, config: GatewayConfig, source: Callable[[gateway_pb2.ImageRef], Awaitable[ImageSource]],
                       ) -> tuple[list[llm_decoder_pb2.ChatMessage], list[ImageSource]]:
    """The decoder's messages (images as placeholders) and the images in order of appearance.
    Every bound is checked before the first image is validated or counted against a quota."""
    if not turns:
        raise InvalidRequest("at least one message is required")
    images = [part.image for turn in turns for part in turn.content if part.WhichOneof("part") == "image"]
    check_bounds(config, messages=len(turns), images=len(images),
                 chars=sum(len(part.text) for turn in turns for part in turn.content),
                 image_bytes=sum(len(image.data) for image in images))
    messages, sources = [], []
    for i, turn in enumerate(turns):
        try:
            check_role(i, turn.role)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        if not turn.content:
            raise InvalidRequest(f"message {i} has no content")
        message = llm_decoder_pb2.ChatMessage(role=turn.role)
        for part in turn.content:
            kind = part.WhichOneof("part")
            if kind == "image":
                if turn.role != "user":
                    raise InvalidRequest(f"message {i}: images and clips belong in user messages, not {turn.role}")
                sources.append(await source(part.image))
                message.content.append(sources[-1].placeholder())
            elif kind == "text":
                message.content.add(text=part.text)
            else:
                raise InvalidRequest(f"message {i}: a part has neither text nor image")
        messages.append(message)
    return messages, sources


def check_bounds(config: GatewayConfig, messages: int, images: int, chars: int, image_bytes: int) -> None:
    """A conversation's size limits, each named in its error: checked before any image is fetched or decoded."""
    if messages > config.max_messages:
        raise TooLarge(f"{messages} messages; the limit is {config.max_messages} (VLSPLIT_MAX_MESSAGES)")
    if images > config.max_images:
        raise TooLarge(f"{images} images in the conversation; the limit is {config.max_images} (VLSPLIT_MAX_IMAGES)")
    if chars > config.max_chat_chars:
        raise TooLarge(f"the messages hold {chars} characters of text; the limit is {config.max_chat_chars} "
                       "(VLSPLIT_MAX_CHAT_CHARS)")
    if image_bytes > config.max_request_image_bytes:
        raise TooLarge(f"the request's images hold {image_bytes} bytes; the limit is {config.max_request_image_bytes} "
                       "(VLSPLIT_MAX_REQUEST_IMAGE_BYTES)")


def route_key(messages: list[llm_decoder_pb2.ChatMessage]) -> str:
    """Where a conversation without images goes: by its first message, so its turns meet their KV."""
    first = messages[0]
    return "text:" + hashlib.sha256(first.SerializeToString(deterministic=True)).hexdigest()


class AnswerParts:
    """One answer's decoder replies, gathered: text, token ids, logprobs, finish reason, usage, and when
    its first token came (Ask's answers and each of Chat's n answers)."""

    def __init__(self, start: float):
        self.start = start
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list = []
        self.ttft_ms: float | None = None
        self.decoder_ttft_ms = 0.0
        self.finish, self.usage = common_pb2.FINISH_REASON_UNSPECIFIED, None

    def add(self, reply: llm_decoder_pb2.GenerateResponse) -> None:
        if self.ttft_ms is None and reply.token_ids:
            self.ttft_ms = (time.perf_counter() - self.start) * 1000
        self.decoder_ttft_ms = self.decoder_ttft_ms or reply.ttft_ms
        self.text.append(reply.text)
        self.token_ids.extend(reply.token_ids)
        self.logprobs.extend(reply.logprobs)
        if reply.finish_reason:
            self.finish, self.usage = reply.finish_reason, reply.usage


class ChatAnswers:
    """Collects the decoder's replies for `n` answers into one ChatResponse."""

    def __init__(self, n: int, image_ids: list[str], start: float):
        self.answers = [AnswerParts(start) for _ in range(n)]
        self.image_ids, self.start = image_ids, start

    def add(self, reply: llm_decoder_pb2.GenerateResponse) -> None:
        self.answers[reply.index].add(reply)

    def response(self, cache: int, encode_ms: float) -> gateway_pb2.ChatResponse:
        """`cache`: the request's gateway_pb2.CacheStatus (ImageFetch.cache_status)."""
        total_ms = (time.perf_counter() - self.start) * 1000
        choices = [gateway_pb2.ChatChoice(index=j, text="".join(a.text), token_ids=a.token_ids, finish_reason=a.finish,
                                          logprobs=a.logprobs, usage=a.usage) for j, a in enumerate(self.answers)]
        first = choices[0].usage
        usage = common_pb2.Usage(prompt_tokens=first.prompt_tokens, image_tokens=first.image_tokens,
                                 completion_tokens=sum(c.usage.completion_tokens for c in choices))
        ttft_ms = min((a.ttft_ms for a in self.answers if a.ttft_ms is not None), default=total_ms)  # of any answer
        decoder_ttft_ms = next((a.decoder_ttft_ms for a in self.answers if a.decoder_ttft_ms), 0.0)
        return gateway_pb2.ChatResponse(
            choices=choices, image_ids=self.image_ids, cache=cache, usage=usage,
            timings=gateway_pb2.Timings(encode_ms=encode_ms, ttft_ms=ttft_ms, total_ms=total_ms,
                                        decoder_ttft_ms=decoder_ttft_ms))
