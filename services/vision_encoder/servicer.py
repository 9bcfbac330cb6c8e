"""VisionEncoder gRPC servicer: proto messages <-> `CachedEncoder` calls, nothing else.

Errors are raised as `VlsplitError`s and mapped to status codes by shared/interceptor.py.
"""

from __future__ import annotations

from shared.errors import InvalidRequest, Unavailable
from shared.transfer import chunks
from vlsplit.v1 import common_pb2, vision_encoder_pb2, vision_encoder_pb2_grpc

from shared.image_ids import check_image_id, scoped_image_id

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
        if source == "image":
            encoder.check_size(request.image)
            image_id = scoped_image_id(request.scope, await encoder.image_id_of(request.image))
            encoded = await encoder.encode(image_id, request.image)
        elif source == "image_id":
            content = check_image_id(request.image_id)
            encoded = await encoder.encode(scoped_image_id(request.scope, content), content=content)
        else:
            raise InvalidRequest("EncodeRequest needs a source: `image` (bytes) or `image_id`")
        yield vision_encoder_pb2.EncodeResponse(info=_info(encoded), cache_hit=encoded.cache_hit,
                                                encode_ms=encoded.encode_ms)
        for chunk in chunks(encoded.blob):
            yield vision_encoder_pb2.EncodeResponse(chunk=chunk)

    async def PutImage(self, request, context):
        upload = await self._ready().put_image(request.image, request.scope)
        return vision_encoder_pb2.PutImageResponse(image_id=upload.image_id, ttl_seconds=upload.ttl_s,
                                                   width=upload.width, height=upload.height)

    async def GetModelInfo(self, request, context):
        info = self._ready().model_info()
        return common_pb2.ModelInfo(model_type=info.model_type, fingerprint=info.fingerprint,
                                    payload_format=info.payload_format, **info.runtime.info_fields())


def _info(encoded: Encoded) -> common_pb2.EmbeddingInfo:
    return common_pb2.EmbeddingInfo(image_id=encoded.image_id, fingerprint=encoded.fingerprint,
                                    grid_thw=list(encoded.grid_thw), n_tokens=encoded.n_tokens,
                                    payload_bytes=len(encoded.blob), dtype=encoded.dtype)
