"""Gateway servicer: proto <-> domain only. Validation happens here, before any image is encoded."""

from __future__ import annotations

import hashlib
import time
from typing import AsyncIterator

from shared.config import GatewayConfig
from shared.errors import InvalidRequest, TooLarge, Unavailable
from shared.image_ids import VideoParams
from shared.sampling import sampling_from_pb
from vlsplit.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, llm_decoder_pb2

from .auth import CLIENT, ImageQuota
from .chat import AnswerParts, ChatAnswers, conversation, route_key
from .pipeline import ImageFetch, ImageSource, Pipeline, question_message


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, config: GatewayConfig):
        self.config = config
        self._pipeline: Pipeline | None = None  # set by the server once its event loop runs
        self.quota = ImageQuota()  # per-client images/day; the server gives it the Redis client

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            raise Unavailable("gateway is starting")
        return self._pipeline

    @pipeline.setter
    def pipeline(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    async def UploadImage(self, request, context):
        ref = gateway_pb2.ImageRef(data=request.data)
        if request.video:
            ref.video.SetInParent()
        source = await self._source(ref)
        reply = await self.pipeline.encoder.put_image(source.data, source.scope, self._timeout(context), request.video)
        return gateway_pb2.UploadImageResponse(image_id=reply.image_id, ttl_seconds=reply.ttl_seconds,
                                               width=reply.width, height=reply.height, frames=reply.frames,
                                               duration_s=reply.duration_s)

    async def Ask(self, request, context):
        final = None
        async for _, final in self._ask(request.image, [request.question], request.sampling, context):
            pass
        return final

    async def AskStream(self, request, context):
        async for delta, final in self._ask(request.image, [request.question], request.sampling, context):
            if delta.text or delta.token_ids:
                yield gateway_pb2.AskStreamResponse(text=delta.text, token_ids=delta.token_ids)
            if final is not None:
                yield gateway_pb2.AskStreamResponse(final=final)

    async def AskMany(self, request, context):
        finals = {}
        async for reply, final in self._ask(request.image, list(request.questions), request.sampling, context):
            if final is not None:
                finals[reply.index] = final
        return gateway_pb2.AskManyResponse(answers=[finals[i] for i in range(len(finals))])

    async def Classify(self, request, context):
        [result] = await self._checks(request.image, [(request.question, list(request.labels))], context)
        return result

    async def Moderate(self, request, context):
        """Every check goes to the decoder in one Classify call: one image fetch (at most one payload
        transfer), the image's prefix computed once, all checks' labels scored in one scheduler."""
        if not request.checks:
            raise InvalidRequest("at least one check is required")
        results = await self._checks(request.image, [(c.question, list(c.labels)) for c in request.checks], context)
        return gateway_pb2.ModerateResponse(results=results)

    async def Chat(self, request, context):
        final = None
        async for _, final in self.chat(request, self._timeout(context)):
            pass
        return final

    async def ChatStream(self, request, context):
        async for reply, final in self.chat(request, self._timeout(context)):
            if final is not None:
                yield gateway_pb2.ChatStreamResponse(final=final)
            elif reply.token_ids or reply.text or reply.finish_reason:
                yield gateway_pb2.ChatStreamResponse(index=reply.index, text=reply.text, token_ids=reply.token_ids,
                                                     logprobs=reply.logprobs, finish_reason=reply.finish_reason)

    async def chat(self, request: gateway_pb2.ChatRequest, timeout: float,
                   ) -> AsyncIterator[tuple[object, gateway_pb2.ChatResponse | None]]:
        """Yields (decoder reply, None) per token message, then (None, the whole ChatResponse).
        The n answers are n rows of one decoder request sharing the conversation's prefix."""
        start = time.perf_counter()
        n, sampling = self.check_chat(request)
        messages, sources = await conversation(request.messages, self.config, self._source)
        header = llm_decoder_pb2.GenerateHeader(messages=messages, sampling=sampling, n=n, cache_salt=self._cache_salt())
        fetch = self.pipeline.fetcher(sources, timeout, route=route_key(messages))
        answers = ChatAnswers(n, [s.image_id for s in sources], start)
        async for reply in self.pipeline.call("Generate", header, fetch, timeout):
            answers.add(reply)
            yield reply, None
        yield None, answers.response(fetch.cache_status, fetch.encode_ms)

    def check_chat(self, request: gateway_pb2.ChatRequest) -> tuple[int, common_pb2.SamplingParams]:
        """n and the sampling parameters, validated (the HTTP API calls this before fetching any image)."""
        n = request.n or 1
        if n > self.config.max_choices:
            raise TooLarge(f"n is {n}; the limit is {self.config.max_choices} (VLSPLIT_MAX_CHOICES)")
        return n, self._sampling(request.sampling)

    async def _checks(self, image: gateway_pb2.ImageRef, checks: list[tuple[str, list[str]]], context,
                      ) -> list[gateway_pb2.ClassifyResponse]:
        start = time.perf_counter()
        self._check_questions([question for question, _ in checks])
        source = await self._source(image)
        if not all(labels for _, labels in checks):
            raise InvalidRequest("at least one label is required")
        header = llm_decoder_pb2.GenerateHeader(batch=[
            llm_decoder_pb2.Conversation(messages=[question_message(question, source)], labels=labels)
            for question, labels in checks], cache_salt=self._cache_salt())
        fetch = self.pipeline.fetcher(source, self._timeout(context))
        scores = {reply.index: reply.scores
                  async for reply in self.pipeline.call("Classify", header, fetch, self._timeout(context))}
        elapsed = (time.perf_counter() - start) * 1000
        return [gateway_pb2.ClassifyResponse(
            question=question, labels=scores[i], image_id=source.image_id, cache=fetch.cache_status,
            timings=gateway_pb2.Timings(encode_ms=fetch.encode_ms, ttft_ms=elapsed, total_ms=elapsed))
            for i, (question, _) in enumerate(checks)]

    async def _ask(self, image: gateway_pb2.ImageRef, questions: list[str], sampling: common_pb2.SamplingParams,
                   context) -> AsyncIterator[tuple[object, gateway_pb2.Answer | None]]:
        """Yields (decoder reply, None) per token message and (reply, Answer) when a question is done.
        Several questions go to the decoder as one batch (one prefix, batched decoding)."""
        start = time.perf_counter()
        self._check_questions(questions)
        source = await self._source(image)
        header = llm_decoder_pb2.GenerateHeader(sampling=self._sampling(sampling), cache_salt=self._cache_salt())
        if len(questions) == 1:
            header.messages.append(question_message(questions[0], source))
        else:
            header.batch.extend(llm_decoder_pb2.Conversation(messages=[question_message(q, source)])
                                for q in questions)
        fetch = self.pipeline.fetcher(source, self._timeout(context))
        answers = [_AnswerBuilder(q, source.image_id, start) for q in questions]
        async for reply in self.pipeline.call("Generate", header, fetch, self._timeout(context)):
            answer = answers[reply.index]
            answer.add(reply)
            yield reply, (answer.build(fetch) if reply.finish_reason else None)

    def _cache_salt(self) -> str:
        """The decoder's prefix-cache partition for this call's client: its own under CACHE_SCOPE=tenant
        (auth on), so no prefix (system prompt, few-shot text) is shared or timed across clients; else ""."""
        name = CLIENT.get().name
        if self.config.cache_scope != "tenant" or not name:
            return ""
        return hashlib.blake2b(name.encode(), digest_size=16, person=b"vlsplit-salt").hexdigest()

    async def _source(self, image: gateway_pb2.ImageRef) -> ImageSource:
        """The request's image, validated; image bytes count against the client's daily quota."""
        kind = image.WhichOneof("source")
        client = CLIENT.get()
        scope = client.name if self.config.cache_scope == "tenant" else ""
        video = VideoParams.from_pb(image.video) if image.HasField("video") else None
        source = (ImageSource(data=image.data, scope=scope, video=video) if kind == "data"
                  else ImageSource(image_id=image.image_id or None, scope=scope, video=video))
        source = source.validated(self.config.max_image_bytes, self.config.max_video_bytes)
        if source.data is not None:
            await self.quota.take(client)
        return source

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
        params = sampling_from_pb(pb, self.config.default_max_new_tokens)
        params = params.validate(self.config.max_new_tokens_limit, self.config.max_stop)
        out = common_pb2.SamplingParams()
        out.CopyFrom(pb)
        out.max_new_tokens = params.max_new_tokens
        return out

    def _timeout(self, context) -> float:
        remaining = context.time_remaining()
        return self.config.deadline_s if remaining is None else max(0.001, min(remaining, self.config.deadline_s))


class _AnswerBuilder(AnswerParts):
    def __init__(self, question: str, image_id: str, start: float):
        super().__init__(start)
        self.question, self.image_id = question, image_id

    def build(self, fetch: ImageFetch) -> gateway_pb2.Answer:
        total_ms = (time.perf_counter() - self.start) * 1000
        return gateway_pb2.Answer(
            question=self.question, text="".join(self.text), token_ids=self.token_ids, image_id=self.image_id,
            cache=fetch.cache_status,
            timings=gateway_pb2.Timings(encode_ms=fetch.encode_ms,
                                        ttft_ms=self.ttft_ms if self.ttft_ms is not None else total_ms,
                                        total_ms=total_ms, decoder_ttft_ms=self.decoder_ttft_ms),
            finish_reason=self.finish, usage=self.usage, logprobs=self.logprobs)
