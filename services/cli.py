"""The server side of the `vlsplit` command line: `serve`, `config`, `up`, `local-ask`, `make-model`.

The client command line (vlsplit/cli.py) knows none of this: it finds these commands through the
`vlsplit.commands` entry point (pyproject.toml) and hands them its sub-parsers. Nothing here imports
more than the standard library until a command runs, so the client-only install lists them too and
says which extra a command needs (`pip install 'vlsplit[gateway]'`, `'vlsplit[model]'`) instead of a
traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from shared.allocator import CHOICES as ALLOCATORS  # torch-free, standard library only
from shared.hardware import DTYPE_NAMES  # torch-free, standard library only
from shared.schema import add_sampling_args

# No hub, ever: every model is a local directory. Set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

QUANTIZE = ("off", "int8")  # shared/quantize.py::MODES
BACKENDS = ("torch", "openvino")  # services/vision_encoder/engine.py::BACKENDS (listing them imports no torch)
DTYPE_HELP = "auto (default): bfloat16 where the CPU/GPU has it natively (AMX, AVX-512 BF16, CUDA), else float32"
QUANTIZE_HELP = "int8: linear weights int8 at load (half the bytes of bf16; see README 'Performance')"
RANDOM_WEIGHTS_WARNING = (
    "NOTE: {model} has RANDOM weights (built by `vlsplit make-model`): its answers are meaningless text.\n"
    "      Point --model at a real Qwen2-VL / Qwen2.5-VL / Qwen3-VL directory for real answers."
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Adds the server commands to the `vlsplit` parser's sub-parsers (the entry point)."""
    p = sub.add_parser("make-model", help="write a random-weight Qwen-VL checkpoint (offline)")
    p.add_argument("dir", type=Path)
    p.add_argument("--family", required=True, choices=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
    p.add_argument("--size", default="tiny", choices=["tiny", "bench"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", default="hub", choices=["hub", "nested"],
                   help="tensor names as the published checkpoints (hub) or as transformers 5 saves (nested)")
    p.add_argument("--max-shard-size", type=int, default=None, metavar="BYTES", help="write a sharded checkpoint")
    p.set_defaults(func=_command(_make_model, "model"))

    p = sub.add_parser("local-ask", help="answer questions about an image in one process (no services)")
    p.add_argument("image", type=Path)
    p.add_argument("questions", nargs="+", metavar="QUESTION")
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    add_sampling_args(p)
    p.add_argument("--dtype", choices=DTYPE_NAMES, help=DTYPE_HELP + " (default: $VLSPLIT_DTYPE, else auto)")
    p.add_argument("--json", action="store_true", help="one JSON object per question")
    p.set_defaults(func=_command(_local_ask, "model"))

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
    p.set_defaults(func=_command(_serve, lambda args: "gateway" if args.service == "gateway" else "model"))

    p = sub.add_parser("config", help="print a service's effective settings: VLSPLIT_* environment over the defaults, "
                                      "checked as `serve` checks them (secrets masked)")
    p.add_argument("service", nargs="?", choices=sorted(SERVICES), help="encoder, decoder or gateway (default: all)")
    p.add_argument("--json", action="store_true", help="one JSON object of VLSPLIT_NAME: value")
    p.set_defaults(func=_command(_config, "server"))

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
    p.set_defaults(func=_command(_up, "model"))


def _command(func, extra: str | Callable[[argparse.Namespace], str]):
    """A command as the client CLI runs it: logging from VLSPLIT_LOG_LEVEL, the server's typed errors as one
    line, and a missing package named with the extra that brings it (`extra`, or a function of the arguments)."""

    @functools.wraps(func)
    def run(args) -> int:
        try:
            from shared.config import env_get
            from shared.errors import VlsplitError

            logging.getLogger().setLevel(env_get("LOG_LEVEL", "WARNING"))
            try:
                return func(args)
            except VlsplitError as exc:
                print(f"vlsplit: error: {exc}", file=sys.stderr)
                return 2
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.split(".")[0] in ("shared", "services", "vlsplit"):
                raise
            wanted = extra(args) if callable(extra) else extra
            print(f"vlsplit: error: this command needs the {wanted} packages (missing: {exc.name}): "
                  f"pip install 'vlsplit[{wanted}]'", file=sys.stderr)
            return 3

    return run


SERVICES = {
    "encoder": ("services.vision_encoder.server", "EncoderConfig"),
    "decoder": ("services.llm_decoder.server", "DecoderConfig"),
    "gateway": ("services.gateway.server", "GatewayConfig"),
}


def _serve(args) -> int:
    import importlib

    from shared import config

    module_name, config_name = SERVICES[args.service]
    config_cls = getattr(config, config_name)
    known = set(config_cls.model_fields)
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


def _config(args) -> int:
    from shared import config

    services = [args.service] if args.service else list(SERVICES)
    loaded = {name: config.settings(config.load(getattr(config, SERVICES[name][1]))) for name in services}
    if args.json:
        values = {name: {env: value for env, value, _ in rows} for name, rows in loaded.items()}
        print(json.dumps(values[args.service] if args.service else values, indent=2))
        return 0
    for name, rows in loaded.items():
        if not args.service:
            print(f"# {name}")
        for env, value, description in rows:
            shown = str(value).lower() if isinstance(value, bool) else value
            print(f"{env}={shown}  # {description}")
    return 0


def _sampling(args):
    from shared.sampling import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))


def _make_model(args) -> int:
    from services.model_builder import make_model

    logging.getLogger("vlsplit").setLevel(logging.INFO)
    path = make_model(args.dir, args.family, args.size, args.seed, args.layout, args.max_shard_size)
    print(f"wrote {args.size} {args.family} checkpoint to {path}")
    print(RANDOM_WEIGHTS_WARNING.format(model=path))
    return 0


def _local_ask(args) -> int:
    from shared.images import load_image

    image = args.image.read_bytes()
    load_image(image)  # a file that is not an image is refused before the models load (seconds)
    import torch

    from services.local import LocalPipeline

    if is_random_checkpoint(args.model):
        print(RANDOM_WEIGHTS_WARNING.format(model=args.model), file=sys.stderr)
    from shared.config import env_get
    from shared.hardware import resolve_dtype

    dtype = resolve_dtype(args.dtype or env_get("DTYPE", "auto"), "cpu").name
    pipeline = LocalPipeline(args.model, dtype=getattr(torch, dtype))
    for answer in pipeline.ask(image, args.questions, _sampling(args).validate(pipeline.decoder.max_new_tokens_limit)):
        if args.json:
            print(json.dumps(answer.to_json()), flush=True)
        else:
            print(f"Q: {answer.question}\nA: {answer.text}\n   ({len(answer.token_ids)} tokens, "
                  f"encode {answer.encode_ms:.0f} ms, ttft {answer.ttft_ms:.0f} ms, total {answer.total_ms:.0f} ms)",
                  flush=True)
    return 0


def _up(args) -> int:
    from services.launcher import Stack, default_model

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


def is_random_checkpoint(model: Path) -> bool:
    from services.model_builder import RANDOM_MARKER

    return (model / RANDOM_MARKER).is_file()
