"""The gateway's HTTP side: the OpenAI-compatible API and the web page, served by uvicorn on the
gateway's own event loop, so it shares the pipeline, pools, caches, auth and limits with gRPC.

    GET  /                       the web page (services/gateway/web/index.html)
    GET  /v1/models              the served model
    POST /v1/chat/completions    chat, streamed as server-sent events with "stream": true
    POST /v1/chat/completions/batch  vLLM's batch: "messages" a list of conversations sharing the sampling;
                                 one choice per conversation (index = its position). One image shared
                                 by one-turn [image, text] conversations -> AskMany (one decoder request,
                                 the image's prefix shared); else each conversation's chat, concurrently
    POST /v1/images              raw image bytes in the body -> {"id": image_id, "url": "vlsplit://<id>"}
    POST /v1/videos              raw clip bytes in the body (probed, stored) -> {"id", "url", "frames",
                                 "duration_s", "width", "height", "expires_in"}
    POST /v1/classify            vlsplit's Moderate: {"image": url | "video": {"url", fps...},
                                 "checks": [{"question", "labels"}]}
    GET  /healthz                200 once the gateway is ready
    GET  /openapi.json           the request bodies' schema (what schemathesis tests against)

Every body is a strict pydantic model (openai_api.py): a field of the wrong type, out of range or
unknown is a 400 before any work, naming the field in `param`. Errors use OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, with the HTTP status of the gRPC code the same
failure gets (invalid 400, unauthenticated 401, scope 403, unknown image 404, body too large 413,
rate or capacity 429 with Retry-After, upstream down 503, deadline 504). Every bound of a chat request
(messages, images, text, image bytes, n, sampling) is checked before its images are fetched; then they
are fetched side by side under one byte budget (VLSPLIT_MAX_REQUEST_IMAGE_BYTES). Clips (`video_url`
parts) count as images there, each under VLSPLIT_MAX_VIDEO_BYTES; POST /v1/videos takes a body up to
VLSPLIT_MAX_VIDEO_BYTES (a larger one is refused, naming it, before it is read).

With TLS (VLSPLIT_TLS_CERT/KEY) the port speaks HTTPS with the gRPC port's certificate, reloaded on
change; with VLSPLIT_TLS_CLIENT_CA it requires client certificates from that CA, as gRPC does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import math
import re
import socket
from importlib import resources
from typing import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from shared.config import GatewayConfig
from shared.errors import Overloaded, TooLarge, VlsplitError
from shared.image_ids import VideoParams
from shared.tls import server_tls
from vlsplit.v1 import gateway_pb2

from .auth import ANONYMOUS, CLIENT, AuthInterceptor
from .chat import check_bounds
from .openai_api import (CACHE, BatchChatCompletionRequest, ChatCompletionRequest, ClassifyRequest, Completion,
                         ask_many_request, chat_request, media_parts, media_url, stats, turns, usage)
from .remote import ImageUrls
from .servicer import GatewayServicer

log = logging.getLogger("vlsplit.gateway.http")

STATUS = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
          "RESOURCE_EXHAUSTED": 429, "FAILED_PRECONDITION": 503, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes ends in 413 before it is all read. `paths`:
    {path: (limit, status, message)} for bodies with a bound of their own (a clip upload: its bytes are
    the clip, so over VLSPLIT_MAX_VIDEO_BYTES is a 400 naming it, as a clip in a data: URL is)."""

    def __init__(self, app, limit: int, paths: dict[str, tuple[int, int, str]] | None = None):
        self.app, self.limit, self.paths = app, limit, paths or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, status, message = self.paths.get(scope.get("path", ""), (self.limit, 413, self.message))
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            code = "invalid_argument" if status == 400 else None
            return await error_response(status, message, code)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            received = await receive()
            seen += len(received.get("body", b""))
            if seen > limit:
                raise (TooLarge(message) if status == 400 else HTTPException(413, message))
            return received

        await self.app(scope, counted, send)

    @property
    def message(self) -> str:
        return f"the request body is over {self.limit} bytes (VLSPLIT_MAX_HTTP_BODY_BYTES)"


def error_response(status: int, message: str, code: str | None = None, headers: dict | None = None,
                   param: str | None = None) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def error_of(exc: Exception) -> JSONResponse:
    if isinstance(exc, VlsplitError):
        status = STATUS.get(exc.grpc_code, 500)
        retry = exc.retry_after_s if isinstance(exc, Overloaded) else None
        headers = {"Retry-After": str(max(1, math.ceil(retry)))} if retry else None
        return error_response(status, str(exc), exc.grpc_code.lower(), headers)
    log.exception("HTTP request failed")
    return error_response(500, f"internal error: {type(exc).__name__}")


class HttpApi:
    def __init__(self, servicer: GatewayServicer, config: GatewayConfig, auth: AuthInterceptor | None):
        self.servicer, self.config, self.auth = servicer, config, auth
        self.urls = ImageUrls(config.max_image_bytes, config.remote_images, config.remote_image_timeout_s,
                              max_video_bytes=config.max_video_bytes)
        self._model: str | None = None
        self.page_headers = page_headers(self.page_html())
        self.app = self._build()

    async def model(self) -> str:
        if self._model is None:
            info = await self.servicer.pipeline.encoder.model_info(self.config.deadline_s)
            self._model = self.config.served_model_name or info.model_type
        return self._model

    async def admit(self, request: Request, method: str) -> None:
        """Authenticate as gRPC does (same tokens, scopes and rate limits); the client rides in CLIENT."""
        client = ANONYMOUS if self.auth is None else await self.auth.authenticate(
            request.headers.get("authorization", ""), method)
        CLIENT.set(client)

    def _build(self) -> FastAPI:
        app = FastAPI(title="vlsplit", version="1", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
        app.add_exception_handler(VlsplitError, lambda _, exc: error_of(exc))
        app.add_exception_handler(RequestValidationError, lambda _, exc: validation_error(exc))
        app.add_exception_handler(HTTPException, lambda _, exc: error_response(exc.status_code, str(exc.detail)))
        app.add_exception_handler(Exception, lambda _, exc: error_of(exc))
        app.add_api_route("/", self.page, methods=["GET"], response_class=HTMLResponse)
        app.add_api_route("/healthz", self.healthz, methods=["GET"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions/batch", self.chat_completions_batch, methods=["POST"])
        app.add_api_route("/v1/images", self.upload, methods=["POST"], openapi_extra=IMAGE_BODY)
        app.add_api_route("/v1/videos", self.upload_video, methods=["POST"], openapi_extra=VIDEO_BODY)
        app.add_api_route("/v1/classify", self.classify, methods=["POST"])
        return app

    @staticmethod
    def page_html() -> str:
        return resources.files("services.gateway").joinpath("web/index.html").read_text()

    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page_html(), headers=self.page_headers)

    async def healthz(self) -> dict:
        await self.model()
        return {"status": "ok"}

    async def models(self, request: Request) -> dict:
        await self.admit(request, "Ask")
        return {"object": "list", "data": [{"id": await self.model(), "object": "model", "created": 0,
                                            "owned_by": "vlsplit"}]}

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        await self.admit(request, "Chat")
        model = await self.model()
        if body.model != model:
            return error_response(404, f"the model {body.model!r} does not exist; this gateway serves {model!r}",
                                  "model_not_found")
        chat = await self._chat(body)
        completion = Completion(model)
        events = self.servicer.chat(chat, self.config.deadline_s)
        if not body.stream:
            final = None
            async for _, final in events:
                pass
            return completion.response(final)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        first = await _first(events)  # errors before the first token still get a status code
        return StreamingResponse(self._sse(completion, first, events, include_usage), media_type="text/event-stream")

    async def chat_completions_batch(self, body: BatchChatCompletionRequest, request: Request):
        """vLLM's batch endpoint. Every conversation's bounds are checked before any image is fetched; the
        batch's images share one byte budget (VLSPLIT_MAX_REQUEST_IMAGE_BYTES)."""
        await self.admit(request, "Chat")
        model = await self.model()
        if body.model != model:
            return error_response(404, f"the model {body.model!r} does not exist; this gateway serves {model!r}",
                                  "model_not_found")
        if len(body.messages) > self.config.max_questions:
            raise TooLarge(f"{len(body.messages)} conversations in the batch; the limit is "
                           f"{self.config.max_questions} (VLSPLIT_MAX_QUESTIONS)")
        conversations = body.conversations()
        for conversation in conversations:
            self._check(conversation)
        completion = Completion(model, "chatcmpl-batch-")
        budget = ImageBytes(self.config.max_request_image_bytes)
        shared = body.shared_image()
        if shared is not None:
            url, questions = shared
            [image] = await self._images([(url, None)], budget)
            reply = await self.servicer.AskMany(ask_many_request(body, image, questions), _Context(self.config))
            return completion.batch_response(list(reply.answers), shared_prefix=True)

        async def answer(conversation: ChatCompletionRequest) -> gateway_pb2.ChatResponse:
            final = None
            async for _, final in self.servicer.chat(await self._chat(conversation, budget), self.config.deadline_s):
                pass
            return final

        try:
            async with asyncio.TaskGroup() as group:  # at most VLSPLIT_MAX_QUESTIONS; the first failure ends all
                tasks = [group.create_task(answer(conversation)) for conversation in conversations]
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None
        return completion.batch_response([task.result() for task in tasks], shared_prefix=False)

    def _check(self, body: ChatCompletionRequest) -> list[tuple[str, VideoParams | None]]:
        """Every bound of a chat request (no image or clip is fetched or decoded for a doomed one); its media."""
        media = [media_url(part) for part in media_parts(body)]
        check_bounds(self.config, messages=len(body.messages), images=len(media),
                     chars=sum(len(part.text) for _, parts in turns(body) for part in parts if part.type == "text"),
                     image_bytes=sum(_data_url_bytes(url) for url, _ in media))
        self.servicer.check_chat(chat_request(body, [gateway_pb2.ImageRef() for _ in media]))
        return media

    async def _chat(self, body: ChatCompletionRequest, budget: ImageBytes | None = None) -> gateway_pb2.ChatRequest:
        """The request, every bound checked first; then its images and clips, fetched side by side under the
        request's byte budget (`budget`: a batch's, shared by its conversations)."""
        media = self._check(body)
        return chat_request(body, await self._images(media, budget))

    async def _images(self, media: list[tuple[str, VideoParams | None]],
                      budget: ImageBytes | None = None) -> list[gateway_pb2.ImageRef]:
        budget = budget or ImageBytes(self.config.max_request_image_bytes)

        async def fetch(url: str, video: VideoParams | None) -> gateway_pb2.ImageRef:
            ref = await self.urls.image_ref(url, video)
            budget.take(len(ref.data))
            return ref

        try:
            async with asyncio.TaskGroup() as group:  # the first failure cancels the other fetches
                tasks = [group.create_task(fetch(url, video)) for url, video in media]
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None
        return [task.result() for task in tasks]

    async def _sse(self, completion: Completion, first, events, include_usage: bool) -> AsyncIterator[str]:
        started: set[int] = set()
        try:
            async for reply, final in _chain(first, events):
                if final is not None:
                    if include_usage:  # vlsplit's stats ride on the usage chunk (choices: [], as OpenAI's)
                        yield _event(completion.chunk([], usage=usage(final.usage), vlsplit=stats(final)))
                    break
                if not (reply.token_ids or reply.text or reply.finish_reason):
                    continue
                yield _event(completion.chunk([completion.delta(reply, reply.index not in started)]))
                started.add(reply.index)
        except Exception as exc:  # noqa: BLE001 - mid-stream: the status is sent; say why in the stream
            yield _event(json.loads(error_of(exc).body))
        finally:  # the client went away (or we are done): end the decoder call now, not at garbage collection
            await events.aclose()
        yield "data: [DONE]\n\n"

    async def upload(self, request: Request) -> dict:
        await self.admit(request, "UploadImage")
        data = await request.body()
        reply = await self.servicer.UploadImage(gateway_pb2.UploadImageRequest(data=data), _Context(self.config))
        return {"id": reply.image_id, "object": "image", "url": f"vlsplit://{reply.image_id}",
                "expires_in": reply.ttl_seconds, "width": reply.width, "height": reply.height}

    async def upload_video(self, request: Request) -> dict:
        """A clip's bytes (the body, raw): probed (container, frames, length, size limits) and stored; its id
        goes in a video_url part as vlsplit://<id>, with any sampling."""
        await self.admit(request, "UploadImage")
        data = await request.body()
        reply = await self.servicer.UploadImage(gateway_pb2.UploadImageRequest(data=data, video=True),
                                                _Context(self.config))
        return {"id": reply.image_id, "object": "video", "url": f"vlsplit://{reply.image_id}",
                "expires_in": reply.ttl_seconds, "width": reply.width, "height": reply.height,
                "frames": reply.frames, "duration_s": round(reply.duration_s, 3)}

    async def classify(self, body: ClassifyRequest, request: Request) -> dict:
        await self.admit(request, "Moderate")
        url, video = body.media()
        moderate = gateway_pb2.ModerateRequest(image=await self.urls.image_ref(url, video))
        for check in body.checks:
            moderate.checks.add(question=check.question, labels=check.labels)
        reply = await self.servicer.Moderate(moderate, _Context(self.config))
        return {"results": [{"question": r.question, "image_id": r.image_id,
                             "cache": CACHE[r.cache],
                             "labels": [{"label": s.label, "prob": s.prob, "logprob": s.logprob} for s in r.labels],
                             "total_ms": round(r.timings.total_ms, 2)} for r in reply.results]}


class ImageBytes:
    """One request's image bytes, counted as its images arrive; over the limit -> 413-style TooLarge."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise TooLarge(f"the request's images hold over {self.limit} bytes (VLSPLIT_MAX_REQUEST_IMAGE_BYTES)")


def _data_url_bytes(url: str) -> int:
    """The bytes a data: URL decodes to (from its length, before decoding); 0 for other URLs."""
    if not url.startswith("data:"):
        return 0
    return len(url.partition(",")[2]) * 3 // 4


class _Context:
    """What the servicer's unary handlers read of a gRPC context, for calls from HTTP."""

    def __init__(self, config: GatewayConfig):
        self.config = config

    def time_remaining(self) -> float:
        return self.config.deadline_s


async def _first(events):
    try:
        return await anext(events)
    except StopAsyncIteration:
        return None


async def _chain(first, events):
    if first is not None:
        yield first
    async for item in events:
        yield item


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def validation_error(exc: RequestValidationError) -> JSONResponse:
    """A body pydantic refused -> 400 in OpenAI's shape: what is wrong, and where (`param`: the first
    offending field, e.g. "messages.0.content" or "logit_bias")."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(400, "the request body is not valid JSON", "invalid_json")
    unsupported = [_field(e) for e in errors if e.get("type") == "extra_forbidden"]
    if unsupported:
        return error_response(400, "unsupported field(s), not honoured by this server: " + ", ".join(unsupported),
                              "unsupported_parameter", param=unsupported[0])
    problems = [f"{_field(e) or 'the body'}: {e.get('msg')}" for e in errors[:5]]
    deepest = max((_field(e) or "" for e in errors), key=len, default="")  # a union's member, not the union
    return error_response(400, "invalid request: " + "; ".join(problems), "invalid_value", param=deepest or None)


def _field(error: dict) -> str | None:
    """The field a pydantic error is about, dotted, without the body prefix and the union members'
    tags (a tagged union repeats its tag before the member's fields: image_url.image_url.url)."""
    loc = [x for x in list(error.get("loc", ()))[1:] if not (isinstance(x, str) and ("[" in x or x in UNION_TAGS))]
    loc = [x for i, x in enumerate(loc) if i == 0 or x != loc[i - 1]]
    return ".".join(str(x) for x in loc) or None


UNION_TAGS = {"str", "int", "float", "bool", "choice", "json_object", "function-after"}
IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
VIDEO_BODY = {"requestBody": {"required": True, "content": {
    mime: {"schema": {"type": "string", "format": "binary"}}
    for mime in ("video/mp4", "video/webm", "video/quicktime", "video/x-matroska", "video/x-msvideo", "image/gif",
                 "application/octet-stream")}}}


def page_headers(html: str) -> dict[str, str]:
    """A strict Content-Security-Policy for the page: only its own inline script and styles (by hash,
    computed from the page as served, so editing it needs no header change), its own API, blob:
    previews (a clip's too: media-src blob:); no framing, no plugins, no base or form targets elsewhere."""
    scripts = [_csp_hash(body) for body in re.findall(r"<script>(.*?)</script>", html, re.S)]
    styles = [_csp_hash(body) for body in re.findall(r"<style>(.*?)</style>", html, re.S)]
    attributes = [_csp_hash(value) for value in re.findall(r'\sstyle="([^"]*)"', html)]
    style_src = " ".join([*styles, *(["'unsafe-hashes'", *attributes] if attributes else [])])
    policy = ("default-src 'none'; script-src " + " ".join(scripts) + "; style-src " + style_src +
              "; img-src 'self' blob: data:; media-src blob:; connect-src 'self'; base-uri 'none'; "
              "form-action 'self'; "
              "frame-ancestors 'none'")
    return {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


class HttpServer:
    """uvicorn on the running loop; the socket is bound before the gateway reports SERVING."""

    def __init__(self, api: HttpApi, config: GatewayConfig):
        clip = (config.max_video_bytes, 400,
                f"the clip is over {config.max_video_bytes} bytes (VLSPLIT_MAX_VIDEO_BYTES)")
        uv = uvicorn.Config(BodyLimit(api.app, config.max_http_body_bytes, {"/v1/videos": clip}), lifespan="off",
                            log_config=None, access_log=False, timeout_graceful_shutdown=config.grace_s,
                            # requests at once, as MAX_CONCURRENT_RPCS for gRPC (503 beyond it)
                            limit_concurrency=config.max_concurrent_rpcs or None)
        uv.load()
        # The gRPC port's TLS, client CA included: with TLS_CLIENT_CA, no client certificate from it, no request.
        tls = server_tls(config.tls_cert, config.tls_key, config.tls_client_ca)
        uv.ssl = tls.ssl_context() if tls else None
        self.server = _Server(uv)
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((config.host, config.http_port))
        self.port = self.socket.getsockname()[1]
        self.task = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.socket]))
        log.info("HTTP API listening", extra={"http_port": self.port})

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        """The gateway's own SIGTERM handling drives shutdown (drain, grace) for gRPC and HTTP alike."""
        yield
