from vlsplit.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ContentPart(_message.Message):
    __slots__ = ("text", "image", "video")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: ImagePlaceholder
    video: VideoPlaceholder
    def __init__(self, text: _Optional[str] = ..., image: _Optional[_Union[ImagePlaceholder, _Mapping]] = ..., video: _Optional[_Union[VideoPlaceholder, _Mapping]] = ...) -> None: ...

class ImagePlaceholder(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VideoPlaceholder(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: _containers.RepeatedCompositeFieldContainer[ContentPart]
    def __init__(self, role: _Optional[str] = ..., content: _Optional[_Iterable[_Union[ContentPart, _Mapping]]] = ...) -> None: ...

class GenerateHeader(_message.Message):
    __slots__ = ("messages", "payload_bytes", "sampling", "request_id", "image_ids", "batch", "labels", "resume_token_ids", "n", "cache_salt")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    payload_bytes: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    request_id: str
    image_ids: _containers.RepeatedScalarFieldContainer[str]
    batch: _containers.RepeatedCompositeFieldContainer[Conversation]
    labels: _containers.RepeatedScalarFieldContainer[str]
    resume_token_ids: _containers.RepeatedScalarFieldContainer[int]
    n: int
    cache_salt: str
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., payload_bytes: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., request_id: _Optional[str] = ..., image_ids: _Optional[_Iterable[str]] = ..., batch: _Optional[_Iterable[_Union[Conversation, _Mapping]]] = ..., labels: _Optional[_Iterable[str]] = ..., resume_token_ids: _Optional[_Iterable[int]] = ..., n: _Optional[int] = ..., cache_salt: _Optional[str] = ...) -> None: ...

class Conversation(_message.Message):
    __slots__ = ("messages", "labels", "resume_token_ids", "seed")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    labels: _containers.RepeatedScalarFieldContainer[str]
    resume_token_ids: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., labels: _Optional[_Iterable[str]] = ..., resume_token_ids: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ...) -> None: ...

class PayloadSizes(_message.Message):
    __slots__ = ("payload_bytes",)
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    payload_bytes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, payload_bytes: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("header", "payload_chunk", "payload_sizes")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_CHUNK_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZES_FIELD_NUMBER: _ClassVar[int]
    header: GenerateHeader
    payload_chunk: bytes
    payload_sizes: PayloadSizes
    def __init__(self, header: _Optional[_Union[GenerateHeader, _Mapping]] = ..., payload_chunk: _Optional[bytes] = ..., payload_sizes: _Optional[_Union[PayloadSizes, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "usage", "ttft_ms", "need_payload", "index", "prefix_cached", "logprobs")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    NEED_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHED_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    ttft_ms: float
    need_payload: bool
    index: int
    prefix_cached: bool
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., ttft_ms: _Optional[float] = ..., need_payload: _Optional[bool] = ..., index: _Optional[int] = ..., prefix_cached: _Optional[bool] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("need_payload", "scores", "prefix_cached", "index")
    NEED_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHED_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    need_payload: bool
    scores: _containers.RepeatedCompositeFieldContainer[_common_pb2.LabelScore]
    prefix_cached: bool
    index: int
    def __init__(self, need_payload: _Optional[bool] = ..., scores: _Optional[_Iterable[_Union[_common_pb2.LabelScore, _Mapping]]] = ..., prefix_cached: _Optional[bool] = ..., index: _Optional[int] = ...) -> None: ...
