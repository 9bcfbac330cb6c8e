"""One image, many questions; many images, several checks each — split stack vs monolithic loop.

    .venv/bin/python bench/many.py [--family qwen2_vl] [--model DIR] [--dtype float32]
                                   [--questions 8] [--max-new-tokens 32] [--images 16] [--checks 4]

1. 8 questions (max 32 new tokens) about one 1024x1024 image: total time of the monolithic loop
   (re-encodes every time) vs the split stack with sequential Ask vs one AskMany.
2. Moderation: N different 448x448 images x 4 yes/no checks, 4 concurrent clients, through
   Moderate (Classify): images/second vs the monolithic loop scoring the same checks.
The floor of case 1 is the compute AskMany cannot avoid, timed inside the very call being
measured: the encoder's vision forward (`vlsplit_encode_seconds`) plus every decoder engine step
(`vlsplit_decoder_step_seconds`, by kind), scraped from the services' /metrics before and after.
Each result is printed as a share of it; what AskMany spends above it is transport and hand-offs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Monolithic, ensure_model, photo  # noqa: E402

QUESTIONS = ["What is in this picture?", "What colours dominate?", "Is there any text in the image?",
             "Describe the texture of the surfaces in detail.", "Is it day or night?",
             "How many objects are there?", "What is in the top left corner?", "Summarise the picture."]
CHECKS = [("Is there violence in this image? Answer yes or no.", ["yes", "no"]),
          ("Is there nudity in this image? Answer yes or no.", ["yes", "no"]),
          ("Is there a weapon in this image? Answer yes or no.", ["yes", "no"]),
          ("Is there any text in this image? Answer yes or no.", ["yes", "no"])]


def split_runs(model: Path, dtype: str, image: bytes, questions, max_new_tokens: int, mod_images, checks) -> dict:
    import grpc

    from services.launcher import Stack, free_port
    from vlsplit.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    stack = Stack(model=model, gateway_port=free_port(), dtype=dtype)
    out = {}
    try:
        address = stack.start()
        channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])
        stub = gateway_pb2_grpc.GatewayStub(channel)
        sampling = common_pb2.SamplingParams(max_new_tokens=max_new_tokens)

        def ask(data, q):
            return stub.Ask(gateway_pb2.AskRequest(image=gateway_pb2.ImageRef(data=data), question=q,
                                                   sampling=sampling), timeout=1200)

        ask(photo(1024, 1024, seed=99), "warm-up")
        start = time.perf_counter()
        out["sequential"] = [list(ask(image, q).token_ids) for q in questions]
        out["sequential_s"] = time.perf_counter() - start
        other = photo(1024, 1024, seed=7)  # a new image, so AskMany pays its own encode
        before = {name: scrape(port) for name, port in stack.metrics_ports.items()}
        start = time.perf_counter()
        many = stub.AskMany(gateway_pb2.AskManyRequest(image=gateway_pb2.ImageRef(data=other), questions=questions,
                                                       sampling=sampling), timeout=1200)
        out["askmany_s"] = time.perf_counter() - start
        after = {name: scrape(port) for name, port in stack.metrics_ports.items()}
        out["floor"] = floor_parts(before, after)
        out["askmany"] = [list(a.token_ids) for a in many.answers]

        def moderate(data):
            request = gateway_pb2.ModerateRequest(image=gateway_pb2.ImageRef(data=data), checks=[
                gateway_pb2.ModerationCheck(question=q, labels=labels) for q, labels in checks])
            return [[(s.label, s.prob) for s in r.labels] for r in stub.Moderate(request, timeout=1200).results]

        moderate(photo(448, 448, seed=98))
        start = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            out["moderation"] = list(pool.map(moderate, mod_images))
        out["moderation_s"] = time.perf_counter() - start
        channel.close()
    finally:
        stack.stop()
    return out


def scrape(port: int) -> dict[tuple, float]:
    """Every sample of a service's /metrics, keyed by (name, sorted labels)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def floor_parts(before: dict, after: dict) -> dict:
    """Seconds of vision forward and of decoder steps (by kind) between two scrapes."""
    def delta(service: str, name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[service].get(key, 0.0) - before[service].get(key, 0.0)

    steps = {kind: delta("decoder", "vlsplit_decoder_step_seconds_sum", kind=kind)
             for kind in ("prefill", "mixed", "decode")}
    return {"vision_s": delta("encoder", "vlsplit_encode_seconds_sum"), **{f"{k}_steps_s": v for k, v in steps.items()},
            "steps": sum(delta("decoder", "vlsplit_decoder_step_seconds_count", kind=k) for k in steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2_vl")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--checks", type=int, default=4)
    args = parser.parse_args()
    import torch

    model = args.model or ensure_model(args.family)
    dtype = getattr(torch, args.dtype)
    image, questions = photo(1024, 1024), QUESTIONS[: args.questions]
    mod_images = [photo(448, 448, seed=200 + i) for i in range(args.images)]
    checks = CHECKS[: args.checks]

    split = split_runs(model, args.dtype, image, questions, args.max_new_tokens, mod_images, checks)
    floor = split["floor"]

    mono = Monolithic(model, dtype)
    mono.ask(photo(1024, 1024, seed=99), "warm-up", args.max_new_tokens)
    start = time.perf_counter()
    loop = [mono.ask(image, q, args.max_new_tokens)["token_ids"] for q in questions]
    loop_s = time.perf_counter() - start
    start = time.perf_counter()
    for data in mod_images:
        for q, labels in checks:
            mono.score(data, q, labels)
    mono_mod_s = time.perf_counter() - start

    floor_s = floor["vision_s"] + floor["prefill_steps_s"] + floor["mixed_steps_s"] + floor["decode_steps_s"]
    print(f"\n1) {len(questions)} questions x {args.max_new_tokens} new tokens, one 1024x1024 image "
          f"({model.name}, {args.dtype})")
    print(f"{'':<28}{'total s':>9}{'speed-up':>10}{'floor share':>13}")
    for name, secs in [("monolithic loop", loop_s), ("split, sequential Ask", split["sequential_s"]),
                       ("split, AskMany", split["askmany_s"])]:
        print(f"{name:<28}{secs:>9.1f}{loop_s / secs:>9.2f}x{floor_s / secs:>12.0%}")
    print(f"AskMany floor {floor_s:.1f} s, timed in that call: vision {floor['vision_s']:.1f} s + "
          f"{floor['steps']:.0f} decoder steps (prefill {floor['prefill_steps_s']:.1f} s, mixed "
          f"{floor['mixed_steps_s']:.1f} s, decode {floor['decode_steps_s']:.1f} s)")
    print(f"sequential tokens == monolithic: {split['sequential'] == loop}")
    n = len(mod_images)
    print(f"\n2) moderation: {n} images x {len(checks)} checks, 4 concurrent clients")
    print(f"monolithic loop {n / mono_mod_s:.2f} images/s; split Moderate {n / split['moderation_s']:.2f} images/s "
          f"({mono_mod_s / split['moderation_s']:.2f}x)")
    print(json.dumps({"loop_s": loop_s, "sequential_s": split["sequential_s"], "askmany_s": split["askmany_s"],
                      **floor, "mono_moderation_s": mono_mod_s, "split_moderation_s": split["moderation_s"]}))


if __name__ == "__main__":
    main()
