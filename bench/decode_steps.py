"""Decode milliseconds per step with a shared image prefix, at batch 1, 8 and 64.

    .venv/bin/python bench/decode_steps.py [--family qwen2_vl] [--dtype float32] [--batches 1,8,64]
                                           [--packed-linear off,all]

One 1024x1024 image (1369 tokens with Qwen2-VL-2B's processor) and N questions about it, asked as
one AskMany request of the in-process engine; a step's time is taken from the engine's own step
records, over the steps that decoded all N rows and prefilled nothing (median). Each
`--packed-linear` mode (the decoder's weight layout on CPU) gets its own engine in the same run,
and the rounds alternate between them, so a noisy machine affects both columns alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ensure_model, photo  # noqa: E402


def decode_ms(decoder, payload, img_id: str, rows: int, new_tokens: int) -> tuple[float, int]:
    from services.llm_decoder.engine import GenerationRequest
    from shared.sampling import SamplingParams
    from shared.processor import question_messages

    requests = [GenerationRequest(question_messages(f"Question number {i}: what is shown?"), [payload],
                                  SamplingParams(max_new_tokens=new_tokens), (img_id,)) for i in range(rows)]
    start = len(decoder.stats.records)
    for _ in decoder.generate_batch(requests):
        pass
    steps = [r.seconds for r in list(decoder.stats.records)[start:] if not r.prefill and len(r.decode) == rows]
    return statistics.median(steps) * 1000, len(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2_vl")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--new-tokens", type=int, default=17)
    parser.add_argument("--packed-linear", default="off,all", help="modes to compare (off, head, all)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import torch

    from services.llm_decoder.engine import DecoderEngine
    from services.vision_encoder.engine import VisionEngine
    from shared.image_ids import image_id
    from shared.images import load_image

    model = args.model or ensure_model(args.family)
    dtype = getattr(torch, args.dtype)
    data = photo(1024, 1024)
    [payload] = VisionEngine(model, dtype=dtype).encode([load_image(data)])
    payload = payload.named(image_id(data))
    modes = args.packed_linear.split(",")
    decoders = {mode: DecoderEngine(model, dtype=dtype, packed_linear=mode) for mode in modes}
    for decoder in decoders.values():
        decode_ms(decoder, payload, image_id(data), 2, 3)  # warm-up; the image prefix is cached from here on
    print(f"{model.name}, {args.dtype}, image prefix {payload.n_tokens} tokens, torch threads {torch.get_num_threads()}")
    print(f"{'rows':>6}" + "".join(f"{'ms/step ' + m:>18}" for m in modes) + f"{'steps':>7}")
    for rows in (int(b) for b in args.batches.split(",")):
        times: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.rounds):
            for mode, decoder in decoders.items():
                ms, steps = decode_ms(decoder, payload, image_id(data), rows, args.new_tokens)
                times[mode].append(ms)
        print(f"{rows:>6}" + "".join(f"{min(v):>10.1f}-{max(v):<7.1f}" for v in times.values()) + f"{steps:>7}")


if __name__ == "__main__":
    main()
