"""One image, many questions; many images, several checks each — split stack vs monolithic loop.

    .venv/bin/python bench/many.py [--family qwen2_vl] [--model DIR] [--dtype float32]
                                   [--questions 8] [--max-new-tokens 32] [--images 16] [--checks 4]

1. 8 questions (max 32 new tokens) about one 1024x1024 image: total time of the monolithic loop
   (re-encodes every time) vs the split stack with sequential Ask vs one AskMany.
2. Moderation: N different 448x448 images x 4 yes/no checks, 4 concurrent clients, through
   Moderate (Classify): images/second vs the monolithic loop scoring the same checks.
The floor of case 1 (one vision pass + one image prefill + the per-question work) is measured
from the engines' own steps in this process, and each result is printed as a share of it.
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

    from vlsplit.launcher import Stack, free_port
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
        start = time.perf_counter()
        many = stub.AskMany(gateway_pb2.AskManyRequest(image=gateway_pb2.ImageRef(data=other), questions=questions,
                                                       sampling=sampling), timeout=1200)
        out["askmany_s"] = time.perf_counter() - start
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


def floor_ms(model: Path, dtype, image: bytes, questions, max_new_tokens: int) -> dict:
    """One vision pass + one image prefill + the questions' own prefills and their batched decode steps,
    timed in the engines themselves (no RPC, no cache, no scheduling): what AskMany cannot beat."""
    import torch

    from vlsplit.services.llm_decoder.batch import generate_batch
    from vlsplit.services.llm_decoder.engine import DecoderEngine, GenerationRequest
    from vlsplit.services.llm_decoder.sampling import SamplingParams
    from vlsplit.services.vision_encoder.engine import VisionEngine
    from vlsplit.shared.images import image_id, load_image
    from vlsplit.shared.processor import question_messages

    encoder, decoder = VisionEngine(model, dtype=dtype), DecoderEngine(model, dtype=dtype)
    pil = load_image(image)
    encoder.encode([load_image(photo(1024, 1024, seed=99))])
    start = time.perf_counter()
    [payload] = encoder.encode([pil])
    vision = time.perf_counter() - start
    prompt = decoder.build_prompt(question_messages(questions[0]), [payload])
    start = time.perf_counter()
    decoder.prefix_state(prompt, (image_id(image),))
    prefix = time.perf_counter() - start
    requests = [GenerationRequest(question_messages(q), [payload], SamplingParams(max_new_tokens=max_new_tokens),
                                  (image_id(image),)) for q in questions]
    start = time.perf_counter()
    for _ in generate_batch(decoder, requests):  # prefix cached: each question's own prefill, batched decode
        pass
    per_question = time.perf_counter() - start
    del torch
    return {"vision_ms": vision * 1000, "prefix_ms": prefix * 1000, "questions_ms": per_question * 1000}


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
    floor = floor_ms(model, dtype, image, questions, args.max_new_tokens)

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

    floor_s = (floor["vision_ms"] + floor["prefix_ms"] + floor["questions_ms"]) / 1000
    print(f"\n1) {len(questions)} questions x {args.max_new_tokens} new tokens, one 1024x1024 image "
          f"({model.name}, {args.dtype})")
    print(f"{'':<28}{'total s':>9}{'speed-up':>10}{'floor share':>13}")
    for name, secs in [("monolithic loop", loop_s), ("split, sequential Ask", split["sequential_s"]),
                       ("split, AskMany", split["askmany_s"])]:
        print(f"{name:<28}{secs:>9.1f}{loop_s / secs:>9.2f}x{floor_s / secs:>12.0%}")
    print(f"floor {floor_s:.1f} s = vision {floor['vision_ms'] / 1000:.1f} s + image prefill "
          f"{floor['prefix_ms'] / 1000:.1f} s + per-question work {floor['questions_ms'] / 1000:.1f} s")
    print(f"sequential tokens == monolithic: {split['sequential'] == loop}")
    n = len(mod_images)
    print(f"\n2) moderation: {n} images x {len(checks)} checks, 4 concurrent clients")
    print(f"monolithic loop {n / mono_mod_s:.2f} images/s; split Moderate {n / split['moderation_s']:.2f} images/s "
          f"({mono_mod_s / split['moderation_s']:.2f}x)")
    print(json.dumps({"loop_s": loop_s, "sequential_s": split["sequential_s"], "askmany_s": split["askmany_s"],
                      **floor, "mono_moderation_s": mono_mod_s, "split_moderation_s": split["moderation_s"]}))


if __name__ == "__main__":
    main()
