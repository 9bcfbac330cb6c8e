from vlsplit.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeRequest(_message.Message):
    __slots__ = ("image", "image_id", "scope", "video", "max_tokens")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    image_id: str
    scope: str
    video: _common_pb2.VideoParams
    max_tokens: int
    def __init__(self, image: _Optional[bytes] = ..., image_id: _Optional[str] = ..., scope: _Optional[str] = ..., video: _Optional[_Union[_common_pb2.VideoParams, _Mapping]] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("info", "chunk", "cache_hit", "encode_ms")
    INFO_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    info: _common_pb2.EmbeddingInfo
    chunk: bytes
    cache_hit: bool
    encode_ms: float
    def __init__(self, info: _Optional[_Union[_common_pb2.EmbeddingInfo, _Mapping]] = ..., chunk: _Optional[bytes] = ..., cache_hit: _Optional[bool] = ..., encode_ms: _Optional[float] = ...) -> None: ...

class PutImageRequest(_message.Message):
    __slots__ = ("image", "scope", "video")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    scope: str
    video: bool
    def __init__(self, image: _Optional[bytes] = ..., scope: _Optional[str] = ..., video: _Optional[bool] = ...) -> None: ...

class PutImageResponse(_message.Message):
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
