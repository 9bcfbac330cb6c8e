"""`vlsplit ask` / `classify` / `health`: the command line's side of the SDK (vlsplit/sdk.py), printing
one line (or JSON object) per question. A clip is asked about as an image is (its bytes first, then
its id), with its sampling (`video`: {fps, min_frames, ...}) on every question."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import grpc

from vlsplit.sdk import Answer, Client, Image, Upload, Video, VlsplitError


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


def model_info(address: str, timeout: float = 3.0, args=None) -> dict | None:
    """What an encoder or decoder at `address` serves (GetModelInfo: model, dtype and why, threads, device,
    quantization, weight bytes) as a dict naming the service; None for a server with neither (a gateway)."""
    from google.protobuf.json_format import MessageToDict

    from vlsplit.v1 import common_pb2, llm_decoder_pb2_grpc, vision_encoder_pb2_grpc

    stubs = (("encoder", vision_encoder_pb2_grpc.VisionEncoderStub), ("decoder", llm_decoder_pb2_grpc.LLMDecoderStub))
    with open_channel(address, args) as channel:
        for name, stub in stubs:
            try:
                info = stub(channel).GetModelInfo(common_pb2.ModelInfoRequest(), timeout=timeout)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    continue
                return {"service": name, "error": exc.code().name}
            return {"service": name, **MessageToDict(info, preserving_proto_field_name=True,
                                                     always_print_fields_with_no_presence=True)}
    return None


def sdk_client(address: str, args) -> Client:
    """A `vlsplit.Client` from the CLI's --token / --tls-* flags (token default: $VLSPLIT_TOKEN)."""
    return Client(address, token=getattr(args, "token", None), tls_ca=getattr(args, "tls_ca", None),
                  tls_cert=getattr(args, "tls_cert", None), tls_key=getattr(args, "tls_key", None),
                  tls_server_name=getattr(args, "tls_server_name", None), timeout=getattr(args, "timeout", 120.0))


def answer_json(answer: Answer) -> dict:
    return {
        "question": answer.question, "text": answer.text, "token_ids": answer.token_ids, "image_id": answer.image_id,
        "cache": "hit" if answer.cache_hit else "miss", "finish_reason": answer.finish_reason or "unknown",
        "encode_ms": round(answer.encode_ms, 2), "ttft_ms": round(answer.ttft_ms, 2),
        "total_ms": round(answer.total_ms, 2), "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
    }


def as_media(source: bytes | Path | str, video: dict | None) -> Image:
    """An image source as it is, or with `video` (a clip's sampling, {} = the model's defaults) a Video."""
    return source if video is None else Video(source, **video)


def ask_questions(address: str, image: bytes | None, image_id: str | None, questions: list[str], args,
                  params, video: dict | None = None) -> int:
    """`video`: the image (bytes or id) is a clip, sampled so ({} = the model's defaults)."""
    source = image if image is not None else image_id
    assert source is not None
    ref = as_media(source, video)
    with sdk_client(address, args) as client:
        for question in questions:
            try:
                answer = _ask_one(client, ref, question, args, params)
                if answer is None and image is not None:  # the id expired everywhere: send the bytes again
                    answer = _ask_one(client, as_media(image, video), question, args, params)
                if answer is None:
                    raise_not_found(image_id)
            except VlsplitError as exc:
                print(f"vlsplit: error: {exc}", file=sys.stderr)
                return 1
            _print(answer, args)
            ref = as_media(answer.image_id, video)  # later questions send the id, not the bytes
    return 0


def _ask_one(client: Client, ref: Image, question: str, args, params) -> Answer | None:
    """The answer, or None when the gateway no longer knows an image_id (NOT_FOUND)."""
    try:
        if not args.stream:
            return client.ask(ref, question, **params)
        return _stream(client, ref, question, args, params)
    except VlsplitError as exc:
        if exc.code == grpc.StatusCode.NOT_FOUND and isinstance(ref.source if isinstance(ref, Video) else ref, str):
            return None
        raise


def raise_not_found(image_id: str | None) -> None:
    raise ValueError(f"image {image_id} is unknown or expired: send the image file instead")


def _stream(client: Client, ref: Image, question: str, args, params) -> Answer:
    """Prints the text as it comes; the timings line comes from the gateway's final answer message."""
    final = None
    for delta in client.ask_stream(ref, question, **params):
        if not args.json:
            print(delta.text, end="", flush=True)
        final = delta.final
    if not args.json:
        print()
    assert isinstance(final, Answer)  # the gateway's last stream message is the whole answer
    return final


def _print(answer: Answer, args) -> None:
    cache = "hit" if answer.cache_hit else "miss"
    if args.json:
        print(json.dumps(answer_json(answer)), flush=True)
    elif args.stream:
        print(f"   [{cache}] encode {answer.encode_ms:.0f} ms, ttft {answer.ttft_ms:.0f} ms, "
              f"total {answer.total_ms:.0f} ms", flush=True)
    else:
        print(f"Q: {answer.question}\nA: {answer.text}\n   [{cache}] encode {answer.encode_ms:.0f} ms, "
              f"ttft {answer.ttft_ms:.0f} ms, total {answer.total_ms:.0f} ms", flush=True)


def classify_image(address: str, image: bytes, question: str, labels: list[str], args,
                   video: dict | None = None) -> int:
    with sdk_client(address, args) as client:
        try:
            result = client.classify(as_media(image, video), question, labels)
        except VlsplitError as exc:
            print(f"vlsplit: error: {exc}", file=sys.stderr)
            return 1
    scores = [{"label": s.label, "prob": s.prob, "logprob": s.logprob} for s in result.labels]
    if args.json:
        print(json.dumps({"question": result.question, "image_id": result.image_id,
                          "cache": "hit" if result.cache_hit else "miss", "labels": scores}), flush=True)
    else:
        print(f"Q: {result.question}")
        for score in scores:
            print(f"   {score['prob']:7.2%}  {score['label']}  (logprob {score['logprob']:.3f})")
    return 0


CHAT_HELP = ("type a message; /image PATH attaches an image or clip (.mp4 .mov .webm .mkv .avi) to your next "
             "message; /reset starts over; /quit ends")


def chat_loop(address: str, images: list[Path], system: str | None, args, params, video: dict | None = None) -> int:
    """`vlsplit chat`: an interactive, multi-turn conversation read line by line from stdin. Images and clips
    are uploaded once and referred to by id, so every turn reuses their embeddings and the decoder's KV.
    `video`: the clips' sampling (None or {} = the model's defaults)."""
    interactive = sys.stdin.isatty()

    def attach(path: Path) -> Image:
        uploaded: Upload = client.upload(path)
        return Video(uploaded, **video) if uploaded.video and video else uploaded

    with sdk_client(address, args) as client:
        base = [{"role": "system", "content": system}] if system else []
        history, pending = list(base), [attach(path) for path in images]
        print(f"vlsplit chat: {CHAT_HELP}", file=sys.stderr)
        while (line := _read_line(interactive)) is not None:
            if not line:
                continue
            if line in ("/quit", "/exit"):
                break
            if line == "/reset":
                history, pending = list(base), []
                continue
            if line.startswith("/image"):
                path = Path(line[len("/image"):].strip())
                pending.append(attach(path))
                print(f"[attached {path.name}]", file=sys.stderr)
                continue
            history.append({"role": "user", "content": [{"type": "image", "image": i} for i in pending] + [line]})
            pending = []
            try:
                text = _chat_turn(client, history, params)
            except VlsplitError as exc:
                print(f"vlsplit: error: {exc}", file=sys.stderr)
                history.pop()
                continue
            history.append({"role": "assistant", "content": text})
    return 0


def _read_line(interactive: bool) -> str | None:
    try:
        line = input("you> ") if interactive else sys.stdin.readline()
    except EOFError:
        return None
    return None if not interactive and not line else line.strip()


def _chat_turn(client: Client, history: list, params) -> str:
    print("assistant> ", end="", flush=True)
    final = None
    for delta in client.chat_stream(history, **params):
        print(delta.text, end="", flush=True)
        final = delta.final
    assert final is not None and not isinstance(final, Answer)
    print(f"\n   [{'hit' if final.cache_hit else 'miss'}] ttft {final.ttft_ms:.0f} ms, total {final.total_ms:.0f} ms",
          flush=True)
    return final.text
