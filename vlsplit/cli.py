"""The `vlsplit` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path

from shared.credentials import new_token, parse_tokens
from shared.schema import SAMPLING_FLAGS, add_sampling_args
from vlsplit.sdk import VIDEO_SUFFIXES, VlsplitError

COMMANDS_ENTRY_POINTS = "vlsplit.commands"  # server commands (serve, up, ...) register here: services/cli.py


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
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line for the user, not a traceback
        if not isinstance(exc, (VlsplitError, OSError, ValueError)):
            raise
        print(f"vlsplit: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlsplit", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    for entry_point in entry_points(group=COMMANDS_ENTRY_POINTS):
        entry_point.load()(sub)

    p = sub.add_parser("ask", help="ask the gateway questions about an image or a video clip")
    p.add_argument("image", nargs="?", type=Path, help="image or clip file (or --image-id)")
    p.add_argument("questions", nargs="*", metavar="QUESTION")
    p.add_argument("--image-id", help="sha256 of an image or clip sent before, instead of IMAGE")
    p.add_argument("--gateway", default="localhost:50051")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("--json", action="store_true", help="one JSON object per question")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline per question, seconds")
    add_sampling_args(p)
    _add_video_args(p)
    _add_gateway_args(p)
    p.set_defaults(func=_ask)

    p = sub.add_parser("chat", help="talk about images, turn by turn (interactive; /image PATH attaches one)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=CHAT_EXAMPLES)
    p.add_argument("images", nargs="*", type=Path, help="images attached to your first message")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--gateway", default="localhost:50051")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline per answer, seconds")
    add_sampling_args(p)
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


def _add_gateway_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", help="the gateway's client token (default: $VLSPLIT_TOKEN)")
    _add_tls_args(p)


def _add_tls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-ca", metavar="PEM", help="connect with TLS, checking the server against this CA bundle")
    p.add_argument("--tls-cert", metavar="PEM", help="client certificate (mutual TLS), with --tls-key")
    p.add_argument("--tls-key", metavar="PEM", help="the client certificate's private key")
    p.add_argument("--tls-server-name", metavar="NAME", help="the name in the server's certificate, if not the host")


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
    sampling = {name: getattr(args, name) for name in VIDEO_FLAGS if getattr(args, name, None) is not None}
    by_suffix = path is not None and path.suffix.lower() in VIDEO_SUFFIXES
    return sampling if sampling or getattr(args, "video", False) or by_suffix else None


def _sampling(args) -> dict:
    """The SDK's sampling keyword arguments from the flags."""
    return {name: getattr(args, name) for name, *_ in SAMPLING_FLAGS} | {"stop": list(args.stop)}


def _ask(args) -> int:
    from vlsplit.commands import ask_questions

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
    from vlsplit.commands import chat_loop

    sampling = {name: getattr(args, name) for name in VIDEO_FLAGS if getattr(args, name) is not None}
    return chat_loop(args.gateway, args.images, args.system, args, _sampling(args), sampling)


def _classify(args) -> int:
    from vlsplit.commands import classify_image

    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if not labels:
        raise ValueError("give at least one label with --labels a,b,c")
    return classify_image(args.gateway, args.image.read_bytes(), args.question, labels, args,
                          _video(args, args.image))


def _health(args) -> int:
    from vlsplit.commands import health_status

    status = health_status(args.address, args.service, args.timeout, args)
    print(status)
    if args.verbose:
        from vlsplit.commands import model_info

        info = model_info(args.address, args.timeout, args)
        for key, value in (info or {"service": "no model (a gateway, or no vlsplit encoder/decoder)"}).items():
            print(f"{key}: {value}")
    return 0 if status == "SERVING" else 1


def _token(args) -> int:
    token, line = new_token(args.name, args.scopes)
    if args.requests_per_s or args.images_per_day:
        line += f":{args.requests_per_s}:{args.images_per_day}"
    parse_tokens(line, 0, 0)  # the same checks the gateway makes: a bad name or scope fails here
    print(f"token (give it to the client; it is not stored anywhere): {token}")
    print(f"line for VLSPLIT_AUTH_TOKENS:                            {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
