"""VisionEncoder gRPC servicer: proto messages <-> `CachedEncoder` calls, nothing else.

Errors are raised as `VlsplitError`s and mapped to status codes by shared/interceptor.py.
"""

from __future__ import annotations

from shared.errors import InvalidRequest, Unavailable
from shared.transfer import chunks
from vlsplit.v1 import common_pb2, vision_encoder_pb2, vision_encoder_pb2_grpc

from shared.image_ids import VideoParams, check_image_id, scoped_image_id, video_media_id

from .cached_encoder import CachedEncoder, Encoded

SERVICE_NAME = vision_encoder_pb2.DESCRIPTOR.services_by_name["VisionEncoder"].full_name


class VisionEncoderServicer(vision_encoder_pb2_grpc.VisionEncoderServicer):
    def __init__(self) -> None:
        self.encoder: CachedEncoder | None = None  # set once the engine is loaded and warmed up

    def attach(self, encoder: CachedEncoder) -> None:
        self.encoder = encoder

    def _ready(self) -> CachedEncoder:
        if self.encoder is None:
            raise Unavailable("loading: the vision tower is not ready yet; retry when health is SERVING")
        return self.encoder

    async def Encode(self, request, context):
        encoder = self._ready()
        source = request.WhichOneof("source")
        video = VideoParams.from_pb(request.video) if request.HasField("video") else None
        clip = encoder.clip_request(video, request.max_tokens) if video else None  # bad sampling: refused first
        data = None
        if source == "image":
            encoder.check_size(request.image, video=video is not None)
            data, content = request.image, await encoder.image_id_of(request.image)
        elif source == "image_id":
            content = check_image_id(request.image_id)
        else:
            raise InvalidRequest("EncodeRequest needs a source: `image` (bytes) or `image_id`")
        stored = scoped_image_id(request.scope, content)  # the id the bytes are uploaded under
        key = scoped_image_id(request.scope, video_media_id(content, video)) if video else stored
        encoded = await encoder.encode(key, data, content=content, stored=stored, clip=clip)
        yield vision_encoder_pb2.EncodeResponse(info=_info(encoded), cache_hit=encoded.cache_hit,
                                                encode_ms=encoded.encode_ms)
        for chunk in chunks(encoded.blob):
            yield vision_encoder_pb2.EncodeResponse(chunk=chunk)

    async def PutImage(self, request, context):
        upload = await self._ready().put_image(request.image, request.scope, request.video)
        return vision_encoder_pb2.PutImageResponse(image_id=upload.image_id, ttl_seconds=upload.ttl_s,
                                                   width=upload.width, height=upload.height, frames=upload.frames,
                                                   duration_s=upload.duration_s)

    async def GetModelInfo(self, request, context):
        info = self._ready().model_info()
        return common_pb2.ModelInfo(model_type=info.model_type, fingerprint=info.fingerprint,
                                    payload_format=info.payload_format, **info.runtime.info_fields())


def _info(encoded: Encoded) -> common_pb2.EmbeddingInfo:
    return common_pb2.EmbeddingInfo(image_id=encoded.image_id, fingerprint=encoded.fingerprint,
                                    grid_thw=list(encoded.grid_thw), n_tokens=encoded.n_tokens,
                                    payload_bytes=len(encoded.blob), dtype=encoded.dtype, video=encoded.video)
