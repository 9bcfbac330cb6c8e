"""The Python SDK: `vlsplit.Client` (blocking) and `vlsplit.AsyncClient` (asyncio) for the gateway.

    from pathlib import Path
    import vlsplit

    with vlsplit.Client("localhost:50051") as client:
        image_id = client.upload(Path("cat.png"))
        print(client.ask(image_id, "What is in this picture?").text)
        for delta in client.ask_stream(image_id, "Describe it."):
            print(delta.text, end="", flush=True)

Images are `bytes`, a `pathlib.Path` to read, or a `str` image id (from `upload` or an earlier answer).
Video clips go wherever an image goes: a `Path` ending in .mp4, .m4v, .mov, .webm, .mkv or .avi is a
clip (a .gif is an image unless wrapped), an id `upload` returned for a clip is one, and
`Video(source, fps=..., max_frames=...)` marks any source (bytes, a file, an id) as a clip with its
sampling (unset = the model's defaults):

    clip = client.upload(Path("clip.mp4"))        # an Upload: the id, with .frames, .duration_s, ...
    print(clip.frames, clip.duration_s)
    client.ask(Video(clip, fps=2), "What happens?")
    client.chat([{"role": "user", "content": [{"type": "video", "video": clip, "fps": 2}, "And then?"]}])
Every call has a deadline (`timeout`, default 120 s, for all its attempts); UNAVAILABLE and RESOURCE_EXHAUSTED are retried
with exponential backoff (a server's `retry-after-ms` hint is honoured), streams only until their
first message. TLS: `tls_ca` (server check), `tls_cert` + `tls_key` (mutual TLS); `token` (or
$VLSPLIT_TOKEN) is sent as `authorization: Bearer <token>`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar, Union, cast

import grpc
import grpc.aio
import tenacity

from shared.schema import check_role, sampling_params
from vlsplit.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

__all__ = ["Answer", "AsyncClient", "ChatChoice", "ChatResult", "Classification", "Client", "Delta", "Image",
           "Label", "Message", "Retry", "Upload", "Video", "VIDEO_SUFFIXES", "VlsplitError", "is_video"]

# A file with one of these suffixes is a clip (.gif is not: an animated GIF is an image unless marked a clip).
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi"})


@dataclass(frozen=True)
class Video:
    """A video clip and how it is sampled into frames; unset fields take the model's defaults (the
    gateway's encoder bounds each, e.g. fps by VLSPLIT_MAX_VIDEO_FPS). `source`: the clip's bytes, a
    file to read, or the id of an uploaded clip."""

    source: Union[bytes, Path, str]
    fps: float | None = None
    min_frames: int | None = None
    max_frames: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None


class Upload(str):
    """What `upload` returns: the id (a str: it goes wherever an image id goes; a clip's stays a clip),
    with what the gateway found: size, and for a clip its frame count and length."""

    video: bool
    width: int
    height: int
    frames: int
    duration_s: float
    ttl_seconds: int

    def __new__(cls, image_id: str, *, video: bool = False, width: int = 0, height: int = 0, frames: int = 0,
                duration_s: float = 0.0, ttl_seconds: int = 0) -> "Upload":
        self = super().__new__(cls, image_id)
        self.video, self.width, self.height, self.frames = video, width, height, frames
        self.duration_s, self.ttl_seconds = duration_s, ttl_seconds
        return self

    @property
    def id(self) -> str:
        return str(self)


Image = Union[bytes, Path, str, Video]  # bytes, a file to read, an image id, or a clip
Message = Mapping[str, Any]  # {"role": ..., "content": str | [str | Image | {"type": "text"|"image"|"video", ...}]}
T = TypeVar("T")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length"}
MAX_MESSAGE_BYTES = 64 << 20


class VlsplitError(Exception):
    """A call failed: `code` is the gRPC status (e.g. INVALID_ARGUMENT), `details` the server's reason."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


@dataclass(frozen=True)
class Retry:
    """Retries of UNAVAILABLE / RESOURCE_EXHAUSTED: `attempts` in all, backoff doubling from
    `initial_s` up to `max_s` (or the server's retry-after-ms hint when it is longer)."""

    attempts: int = 5
    initial_s: float = 0.2
    max_s: float = 5.0


@dataclass(frozen=True)
class Answer:
    question: str
    text: str
    token_ids: list[int]
    image_id: str
    cache_hit: bool
    finish_reason: str
    encode_ms: float
    ttft_ms: float
    total_ms: float
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Delta:
    """Text (and token ids) generated since the previous delta of answer `index`. The stream's last
    delta carries the whole response in `final` (an Answer for ask_stream, a ChatResult for chat_stream)."""

    text: str
    token_ids: list[int]
    index: int = 0
    finish_reason: str | None = None
    final: "Answer | ChatResult | None" = None


@dataclass(frozen=True)
class Label:
    label: str
    prob: float
    logprob: float


@dataclass(frozen=True)
class Classification:
    question: str
    labels: list[Label]  # most likely first
    image_id: str
    cache_hit: bool

    @property
    def top(self) -> str:
        return self.labels[0].label


@dataclass(frozen=True)
class ChatChoice:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    completion_tokens: int


@dataclass(frozen=True)
class ChatResult:
    choices: list[ChatChoice]
    image_ids: list[str]
    cache_hit: bool
    prompt_tokens: int
    ttft_ms: float
    total_ms: float

    @property
    def text(self) -> str:
        return self.choices[0].text


# ---- requests --------------------------------------------------------------------------------------


def is_video(image: object) -> bool:
    """Whether `image` is a clip: a `Video`, an `Upload` of a clip, or a Path with a video suffix."""
    if isinstance(image, Video):
        return True
    if isinstance(image, Upload):
        return image.video
    return isinstance(image, Path) and image.suffix.lower() in VIDEO_SUFFIXES


def image_ref(image: Image) -> gateway_pb2.ImageRef:
    """The ImageRef of an image or clip (a clip's carries its sampling: `ImageRef.video`)."""
    ref = _source_ref(image.source if isinstance(image, Video) else image)
    if is_video(image):
        ref.video.SetInParent()
    if isinstance(image, Video):
        for name in ("fps", "min_frames", "max_frames", "min_pixels", "max_pixels"):
            value = getattr(image, name)
            if value is not None:
                setattr(ref.video, name, value)
    return ref


def _source_ref(image: object) -> gateway_pb2.ImageRef:
    if isinstance(image, (bytes, bytearray)):
        return gateway_pb2.ImageRef(data=bytes(image))
    if isinstance(image, Path):
        return gateway_pb2.ImageRef(data=image.read_bytes())
    if isinstance(image, str):
        return gateway_pb2.ImageRef(image_id=str(image))
    raise TypeError(f"an image is bytes, a pathlib.Path, an image id str or a Video, not {type(image).__name__}")


def upload_request(image: Union[bytes, Path, Video], video: bool | None) -> gateway_pb2.UploadImageRequest:
    """`video`: True = a clip, False = an image, None = by `is_video` (a Path's suffix, a Video)."""
    source = image.source if isinstance(image, Video) else image
    if isinstance(source, str):
        raise TypeError("upload takes bytes or a pathlib.Path (a str is an id, already uploaded)")
    clip = is_video(image) if video is None else video
    return gateway_pb2.UploadImageRequest(data=_source_ref(source).data, video=clip)


def upload_result(request: gateway_pb2.UploadImageRequest, reply: gateway_pb2.UploadImageResponse) -> Upload:
    return Upload(reply.image_id, video=request.video, width=reply.width, height=reply.height, frames=reply.frames,
                  duration_s=reply.duration_s, ttl_seconds=reply.ttl_seconds)


def sampling(max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
             top_k: int | None = None, seed: int | None = None, stop: Sequence[str] = (),
             presence_penalty: float | None = None, frequency_penalty: float | None = None,
             repetition_penalty: float | None = None, logprobs: bool = False, top_logprobs: int = 0,
             json_schema: Mapping[str, Any] | None = None, choices: Sequence[str] | None = None,
             ) -> common_pb2.SamplingParams:
    """Sampling controls; unset = the server's defaults (greedy, its max_new_tokens)."""
    return sampling_params(max_new_tokens, temperature, top_p, top_k, seed, stop, presence_penalty,
                           frequency_penalty, repetition_penalty, logprobs, top_logprobs,
                           None if json_schema is None else json.dumps(json_schema), choices)


def chat_request(messages: Iterable[Message], n: int, params: common_pb2.SamplingParams) -> gateway_pb2.ChatRequest:
    """Content parts: a str is text; bytes, a Path, a Video or an Upload is an image or clip (is_video);
    {"type": "text", "text": str}, {"type": "image", "image": bytes | Path | image id} and
    {"type": "video", "video": bytes | Path | clip id, "fps": ..., "max_frames": ...} say which explicitly."""
    request = gateway_pb2.ChatRequest(n=n, sampling=params)
    for index, message in enumerate(messages):
        check_role(index, str(message["role"]))  # ValueError before anything is sent
        turn = request.messages.add(role=str(message["role"]))
        content = message["content"]
        for part in [content] if isinstance(content, str) else content:
            if isinstance(part, Mapping):
                if part.get("type") == "text":
                    turn.content.add(text=str(part["text"]))
                elif part.get("type") == "video":
                    sampling_fields = {k: v for k, v in part.items() if k not in ("type", "video")}
                    source = part["video"]
                    clip = source if isinstance(source, Video) else Video(source, **sampling_fields)
                    turn.content.add(image=image_ref(clip))
                else:
                    turn.content.add(image=image_ref(part["image"]))
            elif isinstance(part, str):
                turn.content.add(text=part)
            else:
                turn.content.add(image=image_ref(part))
    return request


def checks_request(image: Image, checks: Mapping[str, Sequence[str]]) -> gateway_pb2.ModerateRequest:
    return gateway_pb2.ModerateRequest(image=image_ref(image), checks=[
        gateway_pb2.ModerationCheck(question=q, labels=list(labels)) for q, labels in checks.items()])


# ---- responses -------------------------------------------------------------------------------------


def answer(pb: gateway_pb2.Answer) -> Answer:
    t = pb.timings
    return Answer(pb.question, pb.text, list(pb.token_ids), pb.image_id, pb.cache == gateway_pb2.CACHE_STATUS_HIT,
                  FINISH.get(pb.finish_reason, ""), t.encode_ms, t.ttft_ms, t.total_ms, pb.usage.prompt_tokens,
                  pb.usage.completion_tokens)


def classification(pb: gateway_pb2.ClassifyResponse) -> Classification:
    return Classification(pb.question, [Label(s.label, s.prob, s.logprob) for s in pb.labels], pb.image_id,
                          pb.cache == gateway_pb2.CACHE_STATUS_HIT)


def chat_result(pb: gateway_pb2.ChatResponse) -> ChatResult:
    return ChatResult([ChatChoice(c.index, c.text, list(c.token_ids), FINISH.get(c.finish_reason, ""),
                                  c.usage.completion_tokens) for c in pb.choices],
                      list(pb.image_ids), pb.cache == gateway_pb2.CACHE_STATUS_HIT, pb.usage.prompt_tokens,
                      pb.timings.ttft_ms, pb.timings.total_ms)


def delta(pb: gateway_pb2.AskStreamResponse | gateway_pb2.ChatStreamResponse) -> Delta:
    index = pb.index if isinstance(pb, gateway_pb2.ChatStreamResponse) else 0
    finish = FINISH.get(pb.finish_reason) if isinstance(pb, gateway_pb2.ChatStreamResponse) else None
    return Delta(pb.text, list(pb.token_ids), index, finish)


# ---- channels and retries ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    address: str
    token: str | None
    tls_ca: Path | None
    tls_cert: Path | None
    tls_key: Path | None
    tls_server_name: str | None
    timeout: float
    retry: Retry

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel_args(self) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
        options: list[tuple[str, Any]] = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                          ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        if not (self.tls_ca or self.tls_cert or self.tls_key):
            return None, options
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.tls_ca.read_bytes() if self.tls_ca else None,
            private_key=self.tls_key.read_bytes() if self.tls_key else None,
            certificate_chain=self.tls_cert.read_bytes() if self.tls_cert else None)
        return credentials, options

    def retrying(self, kind: Callable[..., T]) -> T:
        """A tenacity Retrying / AsyncRetrying for this client's policy, within the call's deadline."""
        # stop_before_delay: no attempt starts after the wait would use up the deadline, so the client sees the
        # last real error (UNAVAILABLE: nothing listening), not a DEADLINE_EXCEEDED of an attempt given no time
        return kind(stop=tenacity.stop_after_attempt(self.retry.attempts) | tenacity.stop_before_delay(self.timeout),
                    wait=self._wait, retry=tenacity.retry_if_exception(_retryable), reraise=True)

    def deadline(self) -> Callable[[], float]:
        """Seconds left of a call's `timeout` (every attempt of a call shares one deadline)."""
        end = time.monotonic() + self.timeout
        return lambda: max(0.001, end - time.monotonic())

    def _wait(self, state: tenacity.RetryCallState) -> float:
        backoff = min(self.retry.max_s, self.retry.initial_s * 2.0 ** (state.attempt_number - 1))
        status = _status(state.outcome.exception() if state.outcome is not None else None)
        return max(backoff, status[2]) if status is not None else backoff


def _options(address: str, token: str | None, tls_ca: str | Path | None, tls_cert: str | Path | None,
             tls_key: str | Path | None, tls_server_name: str | None, timeout: float, retry: Retry | None) -> _Options:
    return _Options(address, token or os.environ.get("VLSPLIT_TOKEN"), _path(tls_ca), _path(tls_cert), _path(tls_key),
                    tls_server_name, timeout, retry or Retry())


def _path(value: str | Path | None) -> Path | None:
    return Path(value) if value else None


def _status(exc: BaseException | None) -> tuple[grpc.StatusCode, str, float] | None:
    """(code, details, retry-after seconds) of a gRPC error; None for anything else."""
    if not isinstance(exc, grpc.RpcError):
        return None
    call = cast(Any, exc)  # every RpcError raised by a call is also a grpc.Call
    retry_after_s = 0.0
    for key, value in call.trailing_metadata() or ():
        if key == "retry-after-ms":
            retry_after_s = float(value) / 1000
    return call.code(), call.details() or "", retry_after_s


def _retryable(exc: BaseException) -> bool:
    status = _status(exc)
    return status is not None and status[0] in RETRYABLE


def _error(exc: grpc.RpcError) -> VlsplitError:
    code, details, _ = _status(exc) or (grpc.StatusCode.UNKNOWN, str(exc), 0.0)
    return VlsplitError(code, details)


class Client:
    """A blocking client of the gateway (thread-safe: one channel, shared)."""

    def __init__(self, address: str = "localhost:50051", *, token: str | None = None, tls_ca: str | Path | None = None,
                 tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                 tls_server_name: str | None = None, timeout: float = 120.0, retry: Retry | None = None):
        self._options = _options(address, token, tls_ca, tls_cert, tls_key, tls_server_name, timeout, retry)
        credentials, options = self._options.channel_args()
        self._channel = (grpc.secure_channel(address, credentials, options) if credentials
                         else grpc.insecure_channel(address, options))
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def upload(self, image: bytes | Path | Video, video: bool | None = None) -> Upload:
        """Store the image or clip (`video`: True = a clip; None = by the Path's suffix, or a Video); returns
        its id for later calls (an Upload: a str, with width, height, and a clip's frames and duration_s)."""
        request = upload_request(image, video)
        reply: gateway_pb2.UploadImageResponse = self._unary(self._stub.UploadImage, request)
        return upload_result(request, reply)

    def ask(self, image: Image, question: str, **sampling_args: Any) -> Answer:
        request = gateway_pb2.AskRequest(image=image_ref(image), question=question, sampling=sampling(**sampling_args))
        return answer(self._unary(self._stub.Ask, request))

    def ask_stream(self, image: Image, question: str, **sampling_args: Any) -> Iterator[Delta]:
        """The answer as it is generated; the last item's `finish_reason` is set."""
        request = gateway_pb2.AskRequest(image=image_ref(image), question=question, sampling=sampling(**sampling_args))
        for reply in self._stream(self._stub.AskStream, request):
            if reply.HasField("final"):
                yield Delta("", [], 0, FINISH.get(reply.final.finish_reason, ""), answer(reply.final))
            else:
                yield delta(reply)

    def ask_many(self, image: Image, questions: Sequence[str], **sampling_args: Any) -> list[Answer]:
        request = gateway_pb2.AskManyRequest(image=image_ref(image), questions=list(questions),
                                             sampling=sampling(**sampling_args))
        return [answer(a) for a in self._unary(self._stub.AskMany, request).answers]

    def classify(self, image: Image, question: str, labels: Sequence[str]) -> Classification:
        request = gateway_pb2.ClassifyRequest(image=image_ref(image), question=question, labels=list(labels))
        return classification(self._unary(self._stub.Classify, request))

    def moderate(self, image: Image, checks: Mapping[str, Sequence[str]]) -> list[Classification]:
        """Several checks ({question: labels}) of one image in one call."""
        return [classification(r) for r in self._unary(self._stub.Moderate, checks_request(image, checks)).results]

    def chat(self, messages: Iterable[Message], n: int = 1, **sampling_args: Any) -> ChatResult:
        return chat_result(self._unary(self._stub.Chat, chat_request(messages, n, sampling(**sampling_args))))

    def chat_stream(self, messages: Iterable[Message], n: int = 1, **sampling_args: Any) -> Iterator[Delta]:
        for reply in self._stream(self._stub.ChatStream, chat_request(messages, n, sampling(**sampling_args))):
            yield Delta("", [], 0, None, chat_result(reply.final)) if reply.HasField("final") else delta(reply)

    def _unary(self, method: Any, request: Any) -> Any:
        left = self._options.deadline()
        try:
            for attempt in self._options.retrying(tenacity.Retrying):
                with attempt:
                    return method(request, timeout=left(), metadata=self._options.metadata)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        raise AssertionError("unreachable")

    def _stream(self, method: Any, request: Any) -> Iterator[Any]:
        """Retried while nothing was received (a retry then cannot repeat what the caller saw)."""
        received, left = False, self._options.deadline()
        try:
            for attempt in self._options.retrying(tenacity.Retrying):
                with attempt:
                    try:
                        for reply in method(request, timeout=left(), metadata=self._options.metadata):
                            received = True
                            yield reply
                        return
                    except grpc.RpcError as exc:
                        if received:  # not retried: VlsplitError is final
                            raise _error(exc) from None
                        raise
        except grpc.RpcError as exc:
            raise _error(exc) from None


class AsyncClient:
    """The asyncio client: the same calls as `Client`, as coroutines and async iterators."""

    def __init__(self, address: str = "localhost:50051", *, token: str | None = None, tls_ca: str | Path | None = None,
                 tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                 tls_server_name: str | None = None, timeout: float = 120.0, retry: Retry | None = None):
        self._options = _options(address, token, tls_ca, tls_cert, tls_key, tls_server_name, timeout, retry)
        credentials, options = self._options.channel_args()
        self._channel = (grpc.aio.secure_channel(address, credentials, options) if credentials
                         else grpc.aio.insecure_channel(address, options))
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def upload(self, image: bytes | Path | Video, video: bool | None = None) -> Upload:
        request = upload_request(image, video)
        reply: gateway_pb2.UploadImageResponse = await self._unary(self._stub.UploadImage, request)
        return upload_result(request, reply)

    async def ask(self, image: Image, question: str, **sampling_args: Any) -> Answer:
        request = gateway_pb2.AskRequest(image=image_ref(image), question=question, sampling=sampling(**sampling_args))
        return answer(await self._unary(self._stub.Ask, request))

    async def ask_stream(self, image: Image, question: str, **sampling_args: Any) -> AsyncIterator[Delta]:
        request = gateway_pb2.AskRequest(image=image_ref(image), question=question, sampling=sampling(**sampling_args))
        async for reply in self._stream(self._stub.AskStream, request):
            if reply.HasField("final"):
                yield Delta("", [], 0, FINISH.get(reply.final.finish_reason, ""), answer(reply.final))
            else:
                yield delta(reply)

    async def ask_many(self, image: Image, questions: Sequence[str], **sampling_args: Any) -> list[Answer]:
        request = gateway_pb2.AskManyRequest(image=image_ref(image), questions=list(questions),
                                             sampling=sampling(**sampling_args))
        return [answer(a) for a in (await self._unary(self._stub.AskMany, request)).answers]

    async def classify(self, image: Image, question: str, labels: Sequence[str]) -> Classification:
        request = gateway_pb2.ClassifyRequest(image=image_ref(image), question=question, labels=list(labels))
        return classification(await self._unary(self._stub.Classify, request))

    async def moderate(self, image: Image, checks: Mapping[str, Sequence[str]]) -> list[Classification]:
        reply = await self._unary(self._stub.Moderate, checks_request(image, checks))
        return [classification(r) for r in reply.results]

    async def chat(self, messages: Iterable[Message], n: int = 1, **sampling_args: Any) -> ChatResult:
        return chat_result(await self._unary(self._stub.Chat, chat_request(messages, n, sampling(**sampling_args))))

    async def chat_stream(self, messages: Iterable[Message], n: int = 1, **sampling_args: Any) -> AsyncIterator[Delta]:
        async for reply in self._stream(self._stub.ChatStream, chat_request(messages, n, sampling(**sampling_args))):
            yield Delta("", [], 0, None, chat_result(reply.final)) if reply.HasField("final") else delta(reply)

    async def _unary(self, method: Any, request: Any) -> Any:
        left = self._options.deadline()
        try:
            async for attempt in self._options.retrying(tenacity.AsyncRetrying):
                with attempt:
                    return await method(request, timeout=left(), metadata=self._options.metadata)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        raise AssertionError("unreachable")

    async def _stream(self, method: Any, request: Any) -> AsyncIterator[Any]:
        received, left = False, self._options.deadline()
        try:
            async for attempt in self._options.retrying(tenacity.AsyncRetrying):
                with attempt:
                    try:
                        async for reply in method(request, timeout=left(), metadata=self._options.metadata):
                            received = True
                            yield reply
                        return
                    except grpc.RpcError as exc:
                        if received:
                            raise _error(exc) from None
                        raise
        except grpc.RpcError as exc:
            raise _error(exc) from None
