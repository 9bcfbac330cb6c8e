"""The `vlsplit` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from shared.allocator import CHOICES as ALLOCATORS  # torch-free too
from shared.hardware import DTYPE_NAMES  # torch-free: the gateway-only install runs this CLI too

# No hub, ever: every model is a local directory. Set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

QUANTIZE = ("off", "int8")  # shared/quantize.py::MODES
BACKENDS = ("torch", "openvino")  # services/vision_encoder/engine.py::BACKENDS (the CLI imports no torch)
DTYPE_HELP = "auto (default): bfloat16 where the CPU/GPU has it natively (AMX, AVX-512 BF16, CUDA), else float32"
QUANTIZE_HELP = "int8: linear weights int8 at load (half the bytes of bf16; see README 'Performance')"
RANDOM_WEIGHTS_WARNING = (
    "NOTE: {model} has RANDOM weights (built by `vlsplit make-model`): its answers are meaningless text.\n"
    "      Point --model at a real Qwen2-VL / Qwen2.5-VL / Qwen3-VL directory for real answers."
)


EXAMPLES = """examples:
  vlsplit up                                     # all services on this machine (gateway localhost:50051,
                                                 # OpenAI API and web page on http://localhost:8080)
  vlsplit ask cat.png "What is in this picture?" "What colour is it?"
  vlsplit ask --stream cat.png "Describe it in detail."
  vlsplit ask clip.mp4 "What happens in this video?" --fps 2   # a clip (by its suffix; --video for others)
  vlsplit chat cat.png --system "Answer briefly."
  vlsplit classify cat.png "Is this image safe?" --labels safe,unsafe
  vlsplit make-model ./bench-qwen2 --family qwen2_vl --size bench
  vlsplit serve gateway --encoder enc:50052 --decoder dns:///decoders:50053 --http-port 8080
"""
CHAT_EXAMPLES = r"""examples:
  vlsplit chat cat.png                     # then type questions; each turn sees the whole conversation
  vlsplit chat --system "You are a content moderator." --temperature 0.7
  printf '/image cat.png\nWhat is it?\nAnd its colour?\n' | vlsplit chat   # scripted
"""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from shared.config import env_get

    logging.basicConfig(level=env_get("LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line for the user, not a traceback
        from shared.errors import VlsplitError

        if not isinstance(exc, (VlsplitError, OSError, ValueError)):
            raise
        print(f"vlsplit: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlsplit", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("make-model", help="write a random-weight Qwen-VL checkpoint (offline)")
    p.add_argument("dir", type=Path)
    p.add_argument("--family", required=True, choices=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
    p.add_argument("--size", default="tiny", choices=["tiny", "bench"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", default="hub", choices=["hub", "nested"],
                   help="tensor names as the published checkpoints (hub) or as transformers 5 saves (nested)")
    p.add_argument("--max-shard-size", type=int, default=None, metavar="BYTES", help="write a sharded checkpoint")
    p.set_defaults(func=_make_model)

    p = sub.add_parser("local-ask", help="answer questions about an image in one process (no services)")
    p.add_argument("image", type=Path)
    p.add_argument("questions", nargs="+", metavar="QUESTION")
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    _add_sampling_args(p)
    p.add_argument("--dtype", choices=DTYPE_NAMES, help=DTYPE_HELP + " (default: $VLSPLIT_DTYPE, else auto)")
    p.add_argument("--json", action="store_true", help="one JSON object per question")
    p.set_defaults(func=_local_ask)

    p = sub.add_parser("serve", help="run one service (flags override VLSPLIT_* environment variables)")
    p.add_argument("service", choices=sorted(SERVICES))
    p.add_argument("--model", help="checkpoint directory (encoder, decoder)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--metrics-port", type=int)
    p.add_argument("--port-file", help="write the bound ports here as JSON once serving")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help=DTYPE_HELP)
    p.add_argument("--quantize", choices=QUANTIZE, help=QUANTIZE_HELP + " (encoder, decoder)")
    p.add_argument("--allocator", choices=ALLOCATORS,
                   help="malloc of the encoder/decoder process (default auto: tcmalloc where installed, else glibc "
                        "with raised mmap/trim thresholds)")
    p.add_argument("--backend", dest="encoder_backend", choices=BACKENDS,
                   help="the tower's runtime (encoder): torch (default, the exact reference) or openvino "
                        "(converted at first start, cached; pip install openvino nncf)")
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: every CPU this process may use)")
    p.add_argument("--redis", dest="redis_url", help="redis://host:port/db or 'memory' (encoder, gateway)")
    p.add_argument("--encoder", help="encoder address host:port (gateway)")
    p.add_argument("--decoder", help="decoder address(es) (gateway): host:port, a comma-separated list, or dns:///name:port")
    p.add_argument("--payload-dtype", choices=DTYPE_NAMES[1:], help="dtype of cached embeddings (encoder)")
    p.add_argument("--http-port", type=int, help="OpenAI-compatible HTTP API and web page port (gateway; -1 = off)")
    p.add_argument("--log-json", type=lambda v: v.lower() in ("1", "true", "yes"), help="true|false")
    p.set_defaults(func=_serve)

    p = sub.add_parser("up", help="run encoder, decoder, gateway (and a private Redis) on this machine")
    p.add_argument("--model", type=Path, help="checkpoint directory (default: a tiny random-weight model)")
    p.add_argument("--redis", help="redis://host:port/db, or 'memory' (default: private redis-server if on PATH)")
    p.add_argument("--gateway-port", type=int, default=50051)
    p.add_argument("--http-port", type=int, default=8080, help="OpenAI-compatible API and web page (-1 = off)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help=DTYPE_HELP)
    p.add_argument("--quantize", choices=QUANTIZE, help=QUANTIZE_HELP)
    p.add_argument("--quantize-encoder", choices=QUANTIZE, help="the encoder's, when it differs from --quantize")
    p.add_argument("--encoder-backend", choices=BACKENDS, help="the encoder's tower runtime: torch (default) or openvino")
    p.add_argument("--encoder-threads", type=int, help="torch threads of the encoder (default: every usable CPU)")
    p.add_argument("--decoder-threads", type=int, help="torch threads of the decoder (default: every usable CPU)")
    p.set_defaults(func=_up)

    p = sub.add_parser("ask", help="ask the gateway questions about an image or a video clip")
    p.add_argument("image", nargs="?", type=Path, help="image or clip file (or --image-id)")
    p.add_argument("questions", nargs="*", metavar="QUESTION")
    p.add_argument("--image-id", help="sha256 of an image or clip sent before, instead of IMAGE")
    p.add_argument("--gateway", default="localhost:50051")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("--json", action="store_true", help="one JSON object per question")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline per question, seconds")
    _add_sampling_args(p)
    _add_video_args(p)
    _add_gateway_args(p)
    p.set_defaults(func=_ask)

    p = sub.add_parser("chat", help="talk about images, turn by turn (interactive; /image PATH attaches one)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=CHAT_EXAMPLES)
    p.add_argument("images", nargs="*", type=Path, help="images attached to your first message")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--gateway", default="localhost:50051")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline per answer, seconds")
    _add_sampling_args(p)
    _add_video_args(p, flag=False)
    _add_gateway_args(p)
    p.set_defaults(func=_chat)

    p = sub.add_parser("classify", help="probability of each candidate label as the answer to a question")
    p.add_argument("image", type=Path)
    p.add_argument("question")
    p.add_argument("--labels", required=True, help="comma-separated candidate answers, e.g. yes,no")
    p.add_argument("--gateway", default="localhost:50051")
    p.add_argument("--json", action="store_true", help="one JSON object with labels: [{label, prob, logprob}]")
    p.add_argument("--timeout", type=float, default=120.0)
    _add_video_args(p)
    _add_gateway_args(p)
    p.set_defaults(func=_classify)

    p = sub.add_parser("health", help="exit 0 when a service answers SERVING to gRPC health (container probes)")
    p.add_argument("address", nargs="?", default="localhost:50051", help="host:port (default localhost:50051)")
    p.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="also print what an encoder/decoder serves: dtype and why, threads, CPU, quantization")
    _add_tls_args(p)
    p.set_defaults(func=_health)

    p = sub.add_parser("token", help="make a client token for the gateway, and its line for the token file")
    p.add_argument("name", help="the client's name (shown in logs and metrics)")
    p.add_argument("--scopes", default="*", help="ask, classify, upload, comma-separated, or * (default)")
    p.add_argument("--requests-per-s", default="", help="this client's rate (default: the gateway's)")
    p.add_argument("--images-per-day", default="", help="this client's image quota (default: the gateway's)")
    p.set_defaults(func=_token)
    return parser


SERVICES = {
    "encoder": ("services.vision_encoder.server", "EncoderConfig"),
    "decoder": ("services.llm_decoder.server", "DecoderConfig"),
    "gateway": ("services.gateway.server", "GatewayConfig"),
}


def _serve(args) -> int:
    import dataclasses
    import importlib

    from shared import config

    module_name, config_name = SERVICES[args.service]
    config_cls = getattr(config, config_name)
    known = {f.name for f in dataclasses.fields(config_cls)}
    overrides = {k: v for k, v in vars(args).items() if k in known}
    unsupported = [k for k, v in vars(args).items() if v is not None and k not in known
                   and k not in ("service", "func")]
    if unsupported:
        raise ValueError(f"{args.service} does not take --{unsupported[0].replace('_', '-')}")
    settings = config.load(config_cls, overrides)
    if args.service in ("encoder", "decoder"):  # before torch is imported: restarts this process once
        from shared import allocator

        allocator.reexec(settings.allocator, openvino=getattr(settings, "encoder_backend", "torch") == "openvino")
    importlib.import_module(module_name).main(settings)
    return 0


def _add_gateway_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", help="the gateway's client token (default: $VLSPLIT_TOKEN)")
    _add_tls_args(p)


def _add_tls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-ca", metavar="PEM", help="connect with TLS, checking the server against this CA bundle")
    p.add_argument("--tls-cert", metavar="PEM", help="client certificate (mutual TLS), with --tls-key")
    p.add_argument("--tls-key", metavar="PEM", help="the client certificate's private key")
    p.add_argument("--tls-server-name", metavar="NAME", help="the name in the server's certificate, if not the host")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


VIDEO_HELP = ("IMAGE (or --image-id) is a video clip; implied by a .mp4 .m4v .mov .webm .mkv .avi file and by any "
              "of the sampling flags below (a .gif is an image unless this is given)")


def _add_video_args(p: argparse.ArgumentParser, flag: bool = True) -> None:
    """A clip's sampling (unset = the model's defaults; the gateway's encoder bounds each)."""
    if flag:
        p.add_argument("--video", action="store_true", help=VIDEO_HELP)
    p.add_argument("--fps", type=float, help="clip: frames sampled per second (default: the model's, 2)")
    p.add_argument("--min-frames", type=int, help="clip: fewest frames sampled")
    p.add_argument("--max-frames", type=int, help="clip: most frames sampled")
    p.add_argument("--min-pixels", type=int, help="clip: the processor's lower pixel bound")
    p.add_argument("--max-pixels", type=int, help="clip: the processor's upper pixel bound")


VIDEO_FLAGS = ("fps", "min_frames", "max_frames", "min_pixels", "max_pixels")


def _video(args, path: Path | None) -> dict | None:
    """The clip's sampling ({} = the model's defaults) when IMAGE is a clip, else None."""
    from vlsplit.sdk import VIDEO_SUFFIXES

    sampling = {name: getattr(args, name) for name in VIDEO_FLAGS if getattr(args, name, None) is not None}
    by_suffix = path is not None and path.suffix.lower() in VIDEO_SUFFIXES
    return sampling if sampling or getattr(args, "video", False) or by_suffix else None


def _sampling(args):
    from shared.sampling import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))


def _make_model(args) -> int:
    from vlsplit.make_model import make_model

    logging.getLogger("vlsplit").setLevel(logging.INFO)
    path = make_model(args.dir, args.family, args.size, args.seed, args.layout, args.max_shard_size)
    print(f"wrote {args.size} {args.family} checkpoint to {path}")
    print(RANDOM_WEIGHTS_WARNING.format(model=path))
    return 0


def _local_ask(args) -> int:
    import torch

    from vlsplit.local import LocalPipeline

    if is_random_checkpoint(args.model):
        print(RANDOM_WEIGHTS_WARNING.format(model=args.model), file=sys.stderr)
    from shared.config import env_get
    from shared.hardware import resolve_dtype

    dtype = resolve_dtype(args.dtype or env_get("DTYPE", "auto"), "cpu").name
    pipeline = LocalPipeline(args.model, dtype=getattr(torch, dtype))
    image = args.image.read_bytes()
    for answer in pipeline.ask(image, args.questions, _sampling(args).validate(pipeline.decoder.max_new_tokens_limit)):
        if args.json:
            print(json.dumps(answer.to_json()), flush=True)
        else:
            print(f"Q: {answer.question}\nA: {answer.text}\n   ({len(answer.token_ids)} tokens, "
                  f"encode {answer.encode_ms:.0f} ms, ttft {answer.ttft_ms:.0f} ms, total {answer.total_ms:.0f} ms)",
                  flush=True)
    return 0


def _up(args) -> int:
    from vlsplit.launcher import Stack, default_model

    model = args.model or default_model()
    if is_random_checkpoint(model):
        print(RANDOM_WEIGHTS_WARNING.format(model=model), file=sys.stderr)
    quantize_encoder = args.quantize_encoder or args.quantize
    stack = Stack(model=model, redis=args.redis, gateway_port=args.gateway_port, http_port=args.http_port,
                  host=args.host, dtype=args.dtype, quantize=(quantize_encoder, args.quantize),
                  threads=(args.encoder_threads, args.decoder_threads), encoder_backend=args.encoder_backend)
    try:
        address = stack.start()
        web = f", web page and OpenAI API on http://{args.host}:{args.http_port}" if args.http_port >= 0 else ""
        print(f"vlsplit is up: gateway on {address}{web}  (Ctrl-C to stop)", flush=True)
        stack.wait()
    finally:
        stack.stop()
    return 0


def _ask(args) -> int:
    from vlsplit.client import ask_questions

    if args.image_id:  # with --image-id every positional argument is a question
        questions = ([str(args.image)] if args.image else []) + args.questions
        image, video = None, _video(args, None)
    else:
        if args.image is None:
            raise ValueError("give an IMAGE file or --image-id")
        questions, image, video = args.questions, args.image.read_bytes(), _video(args, args.image)
    if not questions:
        raise ValueError("give at least one QUESTION")
    return ask_questions(args.gateway, image, args.image_id, questions, args, _sampling(args), video)


def _chat(args) -> int:
    from vlsplit.client import chat_loop

    sampling = {name: getattr(args, name) for name in VIDEO_FLAGS if getattr(args, name) is not None}
    return chat_loop(args.gateway, args.images, args.system, args, _sampling(args), sampling)


def _classify(args) -> int:
    from vlsplit.client import classify_image

    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if not labels:
        raise ValueError("give at least one label with --labels a,b,c")
    return classify_image(args.gateway, args.image.read_bytes(), args.question, labels, args,
                          _video(args, args.image))


def _health(args) -> int:
    from vlsplit.client import health_status

    status = health_status(args.address, args.service, args.timeout, args)
    print(status)
    if args.verbose:
        from vlsplit.client import model_info

        info = model_info(args.address, args.timeout, args)
        for key, value in (info or {"service": "no model (a gateway, or no vlsplit encoder/decoder)"}).items():
            print(f"{key}: {value}")
    return 0 if status == "SERVING" else 1


def _token(args) -> int:
    from services.gateway.auth import new_token, parse_tokens

    token, line = new_token(args.name, args.scopes)
    if args.requests_per_s or args.images_per_day:
        line += f":{args.requests_per_s}:{args.images_per_day}"
    parse_tokens(line, 0, 0)  # the same checks the gateway makes: a bad name or scope fails here
    print(f"token (give it to the client; it is not stored anywhere): {token}")
    print(f"line for VLSPLIT_AUTH_TOKENS:                            {line}")
    return 0


def is_random_checkpoint(model: Path) -> bool:
    from vlsplit.make_model import RANDOM_MARKER

    return (model / RANDOM_MARKER).is_file()


if __name__ == "__main__":
    sys.exit(main())
