from vlsplit.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CacheStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CACHE_STATUS_UNSPECIFIED: _ClassVar[CacheStatus]
    CACHE_STATUS_HIT: _ClassVar[CacheStatus]
    CACHE_STATUS_MISS: _ClassVar[CacheStatus]
CACHE_STATUS_UNSPECIFIED: CacheStatus
CACHE_STATUS_HIT: CacheStatus
CACHE_STATUS_MISS: CacheStatus

class ChatTurnPart(_message.Message):
    __slots__ = ("text", "image")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: ImageRef
    def __init__(self, text: _Optional[str] = ..., image: _Optional[_Union[ImageRef, _Mapping]] = ...) -> None: ...

class ChatTurn(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: _containers.RepeatedCompositeFieldContainer[ChatTurnPart]
    def __init__(self, role: _Optional[str] = ..., content: _Optional[_Iterable[_Union[ChatTurnPart, _Mapping]]] = ...) -> None: ...

class ChatRequest(_message.Message):
    __slots__ = ("messages", "sampling", "n")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatTurn]
    sampling: _common_pb2.SamplingParams
    n: int
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatTurn, _Mapping]]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., n: _Optional[int] = ...) -> None: ...

class ChatChoice(_message.Message):
    __slots__ = ("index", "text", "token_ids", "finish_reason", "logprobs", "usage")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: _common_pb2.FinishReason
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    usage: _common_pb2.Usage
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ...) -> None: ...

class ChatResponse(_message.Message):
    __slots__ = ("choices", "image_ids", "cache", "timings", "usage")
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    choices: _containers.RepeatedCompositeFieldContainer[ChatChoice]
    image_ids: _containers.RepeatedScalarFieldContainer[str]
    cache: CacheStatus
    timings: Timings
    usage: _common_pb2.Usage
    def __init__(self, choices: _Optional[_Iterable[_Union[ChatChoice, _Mapping]]] = ..., image_ids: _Optional[_Iterable[str]] = ..., cache: _Optional[_Union[CacheStatus, str]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ...) -> None: ...

class ChatStreamResponse(_message.Message):
    __slots__ = ("index", "text", "token_ids", "logprobs", "finish_reason", "final")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    finish_reason: _common_pb2.FinishReason
    final: ChatResponse
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., final: _Optional[_Union[ChatResponse, _Mapping]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("image", "question", "labels")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    image: ImageRef
    question: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, image: _Optional[_Union[ImageRef, _Mapping]] = ..., question: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("question", "labels", "image_id", "cache", "timings")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    question: str
    labels: _containers.RepeatedCompositeFieldContainer[_common_pb2.LabelScore]
    image_id: str
    cache: CacheStatus
    timings: Timings
    def __init__(self, question: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[_common_pb2.LabelScore, _Mapping]]] = ..., image_id: _Optional[str] = ..., cache: _Optional[_Union[CacheStatus, str]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class ModerationCheck(_message.Message):
    __slots__ = ("question", "labels")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    question: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, question: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...

class ModerateRequest(_message.Message):
    __slots__ = ("image", "checks")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    image: ImageRef
    checks: _containers.RepeatedCompositeFieldContainer[ModerationCheck]
    def __init__(self, image: _Optional[_Union[ImageRef, _Mapping]] = ..., checks: _Optional[_Iterable[_Union[ModerationCheck, _Mapping]]] = ...) -> None: ...

class ModerateResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ClassifyResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[ClassifyResponse, _Mapping]]] = ...) -> None: ...

class ImageRef(_message.Message):
    __slots__ = ("data", "image_id", "video")
    DATA_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    image_id: str
    video: _common_pb2.VideoParams
    def __init__(self, data: _Optional[bytes] = ..., image_id: _Optional[str] = ..., video: _Optional[_Union[_common_pb2.VideoParams, _Mapping]] = ...) -> None: ...

class UploadImageRequest(_message.Message):
    __slots__ = ("data", "video")
    DATA_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    video: bool
    def __init__(self, data: _Optional[bytes] = ..., video: _Optional[bool] = ...) -> None: ...

class UploadImageResponse(_message.Message):
    __slots__ = ("image_id", "ttl_seconds", "width", "height", "frames", "duration_s")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    ttl_seconds: int
    width: int
    height: int
    frames: int
    duration_s: float
    def __init__(self, image_id: _Optional[str] = ..., ttl_seconds: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., frames: _Optional[int] = ..., duration_s: _Optional[float] = ...) -> None: ...

class AskRequest(_message.Message):
    __slots__ = ("image", "question", "sampling")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    image: ImageRef
    question: str
    sampling: _common_pb2.SamplingParams
    def __init__(self, image: _Optional[_Union[ImageRef, _Mapping]] = ..., question: _Optional[str] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class AskManyRequest(_message.Message):
    __slots__ = ("image", "questions", "sampling")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    image: ImageRef
    questions: _containers.RepeatedScalarFieldContainer[str]
    sampling: _common_pb2.SamplingParams
    def __init__(self, image: _Optional[_Union[ImageRef, _Mapping]] = ..., questions: _Optional[_Iterable[str]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("encode_ms", "ttft_ms", "total_ms", "decoder_ttft_ms")
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    DECODER_TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    encode_ms: float
    ttft_ms: float
    total_ms: float
    decoder_ttft_ms: float
    def __init__(self, encode_ms: _Optional[float] = ..., ttft_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., decoder_ttft_ms: _Optional[float] = ...) -> None: ...

class Answer(_message.Message):
    __slots__ = ("question", "text", "token_ids", "image_id", "cache", "timings", "finish_reason", "usage", "logprobs")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    question: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    image_id: str
    cache: CacheStatus
    timings: Timings
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    def __init__(self, question: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., image_id: _Optional[str] = ..., cache: _Optional[_Union[CacheStatus, str]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ...) -> None: ...

class AskStreamResponse(_message.Message):
    __slots__ = ("text", "token_ids", "final")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    final: Answer
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., final: _Optional[_Union[Answer, _Mapping]] = ...) -> None: ...

class AskManyResponse(_message.Message):
    __slots__ = ("answers",)
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    answers: _containers.RepeatedCompositeFieldContainer[Answer]
    def __init__(self, answers: _Optional[_Iterable[_Union[Answer, _Mapping]]] = ...) -> None: ...
