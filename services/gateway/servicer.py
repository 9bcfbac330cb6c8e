"""Gateway servicer: proto <-> domain only. Validation happens here, before any image is encoded."""

from __future__ import annotations

import time
from typing import AsyncIterator

from vlsplit.shared.config import GatewayConfig
from vlsplit.shared.errors import InvalidRequest, TooLarge, Unavailable
from vlsplit.shared.sampling import sampling_from_pb
from vlsplit.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

from .pipeline import Embeddings, ImageSource, Pipeline

CACHE_STATUS = {True: gateway_pb2.CACHE_STATUS_HIT, False: gateway_pb2.CACHE_STATUS_MISS}


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, config: GatewayConfig):
        self.config = config
        self._pipeline: Pipeline | None = None  # set by the server once its event loop runs

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            raise Unavailable("gateway is starting")
        return self._pipeline

    @pipeline.setter
    def pipeline(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    async def UploadImage(self, request, context):
        source = ImageSource(data=request.data).validated(self.config.max_image_bytes)
        reply = await self.pipeline.encoder.put_image(source.data, self._timeout(context))
        return gateway_pb2.UploadImageResponse(image_id=reply.image_id, ttl_seconds=reply.ttl_seconds)

    async def Ask(self, request, context):
        final = None
        async for _, final in self._ask(request.image, [request.question], request.sampling, context):
            pass
        return final

    async def AskStream(self, request, context):
        async for delta, final in self._ask(request.image, [request.question], request.sampling, context):
            if final is not None:
                yield gateway_pb2.AskStreamResponse(final=final)
            elif delta.text or delta.token_ids:
                yield gateway_pb2.AskStreamResponse(text=delta.text, token_ids=delta.token_ids)

    async def AskMany(self, request, context):
        answers = [final async for _, final in self._ask(request.image, list(request.questions), request.sampling,
                                                         context) if final is not None]
        return gateway_pb2.AskManyResponse(answers=answers)

    async def _ask(self, image: gateway_pb2.ImageRef, questions: list[str], sampling: common_pb2.SamplingParams,
                   context) -> AsyncIterator[tuple[object, gateway_pb2.Answer | None]]:
        """Yields (decoder reply, None) per token message and (None, Answer) once per question."""
        start = time.perf_counter()
        timeout = self._timeout(context)
        source = self._source(image)
        self._check_questions(questions)
        sampling = self._sampling(sampling)
        emb = await self.pipeline.embeddings(source, timeout)
        for i, question in enumerate(questions):
            answer = _AnswerBuilder(question, emb, first=i == 0, start=start if i == 0 else time.perf_counter())
            async for reply in self.pipeline.generate(question, emb, sampling, source, self._timeout(context)):
                answer.add(reply)
                yield reply, None
            yield None, answer.build()

    def _source(self, image: gateway_pb2.ImageRef) -> ImageSource:
        kind = image.WhichOneof("source")
        source = ImageSource(data=image.data) if kind == "data" else ImageSource(image_id=image.image_id or None)
        return source.validated(self.config.max_image_bytes)

    def _check_questions(self, questions: list[str]) -> None:
        if not questions:
            raise InvalidRequest("at least one question is required")
        if len(questions) > self.config.max_questions:
            raise TooLarge(f"{len(questions)} questions; the limit is {self.config.max_questions}")
        for question in questions:
            if not question.strip():
                raise InvalidRequest("question is empty")
            if len(question) > self.config.max_question_chars:
                raise TooLarge(f"question is {len(question)} characters; the limit is {self.config.max_question_chars}")

    def _sampling(self, pb: common_pb2.SamplingParams) -> common_pb2.SamplingParams:
        """Validated here (no image is encoded for a doomed request); the gateway's default applies."""
        params = sampling_from_pb(pb, self.config.default_max_new_tokens).validate(self.config.max_new_tokens_limit)
        out = common_pb2.SamplingParams()
        out.CopyFrom(pb)
        out.max_new_tokens = params.max_new_tokens
        return out

    def _timeout(self, context) -> float:
        remaining = context.time_remaining()
        return self.config.deadline_s if remaining is None else max(0.001, min(remaining, self.config.deadline_s))


class _AnswerBuilder:
    def __init__(self, question: str, emb: Embeddings, first: bool, start: float):
        self.question, self.emb, self.first, self.start = question, emb, first, start
        self.text, self.token_ids = [], []
        self.ttft_ms = None
        self.decoder_ttft_ms = 0.0
        self.finish, self.usage = common_pb2.FINISH_REASON_UNSPECIFIED, None

    def add(self, reply) -> None:
        if self.ttft_ms is None and reply.token_ids:
            self.ttft_ms = (time.perf_counter() - self.start) * 1000
        self.decoder_ttft_ms = self.decoder_ttft_ms or reply.ttft_ms
        self.text.append(reply.text)
        self.token_ids.extend(reply.token_ids)
        if reply.finish_reason:
            self.finish, self.usage = reply.finish_reason, reply.usage

    def build(self) -> gateway_pb2.Answer:
        total_ms = (time.perf_counter() - self.start) * 1000
        return gateway_pb2.Answer(
            question=self.question, text="".join(self.text), token_ids=self.token_ids, image_id=self.emb.image_id,
            # later questions of an AskMany reuse the embeddings fetched for the first
            cache=CACHE_STATUS[self.emb.cache_hit or not self.first],
            timings=gateway_pb2.Timings(encode_ms=self.emb.encode_ms if self.first else 0.0,
                                        ttft_ms=self.ttft_ms if self.ttft_ms is not None else total_ms,
                                        total_ms=total_ms, decoder_ttft_ms=self.decoder_ttft_ms),
            finish_reason=self.finish, usage=self.usage)
