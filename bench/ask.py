"""Per-question latency of the split stack (cold, then warm cache) against the monolithic model
re-encoding the image for every question, in the same run, on a `bench` checkpoint and a
1024x1024 image; and the cache-hit overhead (Redis read + hand-off of the payload to the decoder)
in ms and as a share of TTFT.

    .venv/bin/python bench/ask.py [--family qwen2_vl] [--model DIR] [--dtype float32]
                                  [--questions 4] [--max-new-tokens 16] [--size 1024]

The split stack runs as real processes (private redis-server, encoder, decoder, gateway) through
`services.launcher.Stack`, exactly as `vlsplit up` starts them; the monolithic model runs here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Monolithic, ensure_model, photo  # noqa: E402

QUESTIONS = ["What is in this picture?", "What colours dominate?", "Is there any text in the image?",
             "Describe the texture.", "Is it day or night?", "How many objects are there?",
             "What is in the top left corner?", "Summarise the picture in one word."]


def split_answers(model: Path, dtype: str, image: bytes, warmup: bytes, questions: list[str],
                  max_new_tokens: int) -> list:
    import grpc

    from services.launcher import Stack, free_port
    from vlsplit.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    stack = Stack(model=model, gateway_port=free_port(), dtype=dtype)
    try:
        address = stack.start()
        with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            sampling = common_pb2.SamplingParams(max_new_tokens=max_new_tokens)
            stub.Ask(gateway_pb2.AskRequest(image=gateway_pb2.ImageRef(data=warmup), question="warm-up",
                                            sampling=sampling), timeout=600)
            answers = []
            for question in questions:  # first: miss (cold cache); then hits
                request = gateway_pb2.AskRequest(image=gateway_pb2.ImageRef(data=image), question=question,
                                                 sampling=sampling)
                answers.append(stub.Ask(request, timeout=600))
            return answers
    finally:
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2_vl")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    args = parser.parse_args()
    import torch

    torch.manual_seed(0)
    model = args.model or ensure_model(args.family)
    image = photo(args.size, args.size)
    # Both sides first answer one question about another image of the same size, so "cold" below
    # means a cold embedding cache, not a cold process (allocator, first-shape kernels).
    warmup = photo(args.size, args.size, seed=99)
    questions = QUESTIONS[: args.questions]

    split = split_answers(model, args.dtype, image, warmup, questions, args.max_new_tokens)
    mono = Monolithic(model, getattr(torch, args.dtype))
    mono.ask(warmup, "warm-up", args.max_new_tokens)
    base = [mono.ask(image, q, args.max_new_tokens) for q in questions]

    same = all(list(s.token_ids) == b["token_ids"] for s, b in zip(split, base))
    cold, warm = split[0], split[1:]
    mono_total = statistics.mean(b["total_ms"] for b in base)
    mono_ttft = statistics.mean(b["ttft_ms"] for b in base)
    warm_total = statistics.mean(a.timings.total_ms for a in warm)
    warm_ttft = statistics.mean(a.timings.ttft_ms for a in warm)
    redis_ms = statistics.mean(a.timings.encode_ms for a in warm)
    handoff_ms = statistics.mean(a.timings.ttft_ms - a.timings.encode_ms - a.timings.decoder_ttft_ms for a in warm)
    overhead = redis_ms + handoff_ms
    payload_tokens = warm[0].usage.image_tokens
    print(f"model {model.name}, {args.dtype}, {args.size}x{args.size} image ({payload_tokens} image tokens), "
          f"{len(questions)} questions x {args.max_new_tokens} new tokens; split tokens == monolithic: {same}")
    print(f"{'per question':<34}{'ttft ms':>10}{'total ms':>10}{'vs monolithic':>15}")
    print(f"{'monolithic (re-encodes each time)':<34}{mono_ttft:>10.0f}{mono_total:>10.0f}{1:>15.2f}")
    print(f"{'split, cold cache (1st question)':<34}{cold.timings.ttft_ms:>10.0f}{cold.timings.total_ms:>10.0f}"
          f"{cold.timings.total_ms / mono_total:>15.2f}")
    print(f"{'split, warm cache (others, mean)':<34}{warm_ttft:>10.0f}{warm_total:>10.0f}"
          f"{warm_total / mono_total:>15.2f}")
    print(f"cache-hit overhead: {overhead:.1f} ms = Redis read {redis_ms:.1f} ms + hand-off to decoder "
          f"{handoff_ms:.1f} ms; {100 * overhead / warm_ttft:.1f}% of warm TTFT")
    print(json.dumps({"model": str(model), "dtype": args.dtype, "image_tokens": payload_tokens, "same_tokens": same,
                      "mono_total_ms": mono_total, "mono_ttft_ms": mono_ttft,
                      "cold_total_ms": cold.timings.total_ms, "cold_ttft_ms": cold.timings.ttft_ms,
                      "warm_total_ms": warm_total, "warm_ttft_ms": warm_ttft,
                      "hit_redis_ms": redis_ms, "hit_handoff_ms": handoff_ms}))


if __name__ == "__main__":
    main()
