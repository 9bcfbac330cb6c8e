"""`vlsplit ask` / `classify` / `health`: a small gRPC client of the gateway, printing one line (or JSON object) per question."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import grpc

from vlsplit.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

CACHE = {gateway_pb2.CACHE_STATUS_HIT: "hit", gateway_pb2.CACHE_STATUS_MISS: "miss"}
FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length"}


def open_channel(address: str, args=None, options: list | None = None) -> grpc.Channel:
    """A channel to `address`: TLS when `args` has --tls-ca (server certificate check) or
    --tls-cert/--tls-key (client certificate), else plaintext."""
    options = list(options or [])
    ca, cert, key = (getattr(args, name, None) for name in ("tls_ca", "tls_cert", "tls_key"))
    if not (ca or cert or key):
        return grpc.insecure_channel(address, options=options)
    if bool(cert) != bool(key):
        raise ValueError("--tls-cert and --tls-key go together")
    if getattr(args, "tls_server_name", None):
        options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    credentials = grpc.ssl_channel_credentials(root_certificates=_read(ca), private_key=_read(key),
                                               certificate_chain=_read(cert))
    return grpc.secure_channel(address, credentials, options=options)


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call (the gateway's client authentication)."""

    def __init__(self, token: str):
        self.metadata = ("authorization", f"Bearer {token}")

    def _details(self, details):
        return details._replace(metadata=[*(details.metadata or ()), self.metadata])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


def gateway_channel(address: str, args, options: list | None = None) -> grpc.Channel:
    """`open_channel`, plus the token of --token / VLSPLIT_TOKEN when there is one."""
    channel = open_channel(address, args, options)
    token = getattr(args, "token", None) or os.environ.get("VLSPLIT_TOKEN")
    return grpc.intercept_channel(channel, BearerToken(token)) if token else channel


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def health_status(address: str, service: str = "", timeout: float = 3.0, args=None) -> str:
    """The gRPC health status name of `service` at `address` (SERVING, NOT_SERVING, ...), or the error's
    code name (UNAVAILABLE, DEADLINE_EXCEEDED, NOT_FOUND for an unknown service)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with open_channel(address, args) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def sampling_pb(params) -> common_pb2.SamplingParams:
    pb = common_pb2.SamplingParams(max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                                   top_p=params.top_p, top_k=params.top_k, stop=list(params.stop))
    if params.seed is not None:
        pb.seed = params.seed
    return pb


def answer_json(answer: gateway_pb2.Answer) -> dict:
    return {
        "question": answer.question, "text": answer.text, "token_ids": list(answer.token_ids),
        "image_id": answer.image_id, "cache": CACHE.get(answer.cache, "unknown"),
        "finish_reason": FINISH.get(answer.finish_reason, "unknown"),
        "encode_ms": round(answer.timings.encode_ms, 2), "ttft_ms": round(answer.timings.ttft_ms, 2),
        "total_ms": round(answer.timings.total_ms, 2),
        "prompt_tokens": answer.usage.prompt_tokens, "completion_tokens": answer.usage.completion_tokens,
    }


def ask_questions(address: str, image: bytes | None, image_id: str | None, questions: list[str], args,
                  params) -> int:
    ref = gateway_pb2.ImageRef(data=image) if image is not None else gateway_pb2.ImageRef(image_id=image_id)
    options = [("grpc.max_send_message_length", 64 << 20)]
    with gateway_channel(address, args, options) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for question in questions:
            try:
                answer = _ask_one(stub, ref, question, args, params)
                if answer is None and image is not None:  # the id expired everywhere: send the bytes again
                    answer = _ask_one(stub, gateway_pb2.ImageRef(data=image), question, args, params)
                if answer is None:
                    raise_not_found(image_id)
            except grpc.RpcError as exc:
                print(f"vlsplit: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
            _print(answer, args)
            ref = gateway_pb2.ImageRef(image_id=answer.image_id)  # later questions send the id, not the bytes
    return 0


def _ask_one(stub, ref, question, args, params) -> gateway_pb2.Answer | None:
    """The answer, or None when the gateway no longer knows an image_id (NOT_FOUND)."""
    request = gateway_pb2.AskRequest(image=ref, question=question, sampling=sampling_pb(params))
    try:
        return _stream(stub, request, args) if args.stream else stub.Ask(request, timeout=args.timeout)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND and ref.WhichOneof("source") == "image_id":
            return None
        raise


def raise_not_found(image_id: str | None) -> None:
    raise ValueError(f"image {image_id} is unknown or expired: send the image file instead")


def _stream(stub, request, args) -> gateway_pb2.Answer:
    final = None
    for reply in stub.AskStream(request, timeout=args.timeout):
        if reply.HasField("final"):
            final = reply.final
        elif not args.json:
            print(reply.text, end="", flush=True)
    if not args.json:
        print()
    return final


def _print(answer: gateway_pb2.Answer, args) -> None:
    if args.json:
        print(json.dumps(answer_json(answer)), flush=True)
    elif args.stream:
        print(f"   [{CACHE.get(answer.cache)}] encode {answer.timings.encode_ms:.0f} ms, "
              f"ttft {answer.timings.ttft_ms:.0f} ms, total {answer.timings.total_ms:.0f} ms", flush=True)
    else:
        print(f"Q: {answer.question}\nA: {answer.text}\n   [{CACHE.get(answer.cache)}] "
              f"encode {answer.timings.encode_ms:.0f} ms, ttft {answer.timings.ttft_ms:.0f} ms, "
              f"total {answer.timings.total_ms:.0f} ms", flush=True)


def classify_image(address: str, image: bytes, question: str, labels: list[str], args) -> int:
    request = gateway_pb2.ClassifyRequest(image=gateway_pb2.ImageRef(data=image), question=question, labels=labels)
    with gateway_channel(address, args, [("grpc.max_send_message_length", 64 << 20)]) as channel:
        try:
            result = gateway_pb2_grpc.GatewayStub(channel).Classify(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"vlsplit: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    scores = [{"label": s.label, "prob": s.prob, "logprob": s.logprob} for s in result.labels]
    if args.json:
        print(json.dumps({"question": result.question, "image_id": result.image_id,
                          "cache": CACHE.get(result.cache, "unknown"), "labels": scores,
                          "total_ms": round(result.timings.total_ms, 2)}), flush=True)
    else:
        print(f"Q: {result.question}")
        for score in scores:
            print(f"   {score['prob']:7.2%}  {score['label']}  (logprob {score['logprob']:.3f})")
    return 0
