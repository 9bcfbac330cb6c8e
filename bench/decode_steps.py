"""Decode milliseconds per step at 1, 8 and 64 rows, against the weight-bandwidth floor measured in
the same run.

    .venv/bin/python bench/decode_steps.py [--family qwen2_vl] [--dtype auto] [--batches 1,8,64]
                                           [--variants all,int8] [--prompts shared|distinct]

`--prompts shared` (default): one 1024x1024 image (1369 tokens with Qwen2-VL-2B's processor) and N
questions about it, asked as one AskMany request of the in-process engine (the rows share the image
prefix: the cascade). `distinct`: N text prompts of about as many tokens that share nothing, so every
row attends alone (paged or gathered). A step's time is taken from the engine's own step records,
over the steps that decoded all N rows and prefilled nothing (median). A variant is `+`-joined
parts: a `packed_linear` mode (off, head, all: the decoder's weight layout on CPU; default all),
`int8` (int8 weights, `--quantize int8`), `gather` (decode rows gather their context, instead of the
server default `auto`: the paged kernel), `mv` / `nomv` (one-row bf16 calls forced to `torch.mv` / oneDNN's
packed GEMV; by default the decoder times both at load, `choose_one_row_kernel`). Each gets its own engine in the same run and the rounds
alternate between them, so a noisy machine affects every column alike.

The floor: a decode step must read every weight it multiplies once (the layers' matrices and the
LM head; the embedding table only where it is the tied head), so bytes read / the memory read
bandwidth measured here is the fastest a step can be at one row.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ensure_model, machine, photo, read_bandwidth_gbs  # noqa: E402


def decode_ms(decoder, payload, img_id: str, rows: int, new_tokens: int, distinct: bool = False) -> tuple[float, int]:
    from services.llm_decoder.engine import GenerationInput
    from shared.sampling import SamplingParams
    from shared.schema import question_messages

    if distinct:  # ~1,400 tokens each, different from the first token on: nothing shared, nothing cached
        # prefilled over several steps: the first rows must still be decoding when the last one joins
        requests = [GenerationInput(question_messages(_text(rows * 1000 + i, payload.n_tokens), n_images=0), [],
                                      SamplingParams(max_new_tokens=new_tokens + rows)) for i in range(rows)]
    else:
        requests = [GenerationInput(question_messages(f"Question number {i}: what is shown?"), [payload],
                                      SamplingParams(max_new_tokens=new_tokens), (img_id,)) for i in range(rows)]
    start = len(decoder.stats.records)
    for _ in decoder.generate_batch(requests):
        pass
    steps = [r.seconds for r in list(decoder.stats.records)[start:] if not r.prefill and len(r.decode) == rows]
    return statistics.median(steps) * 1000, len(steps)


_rounds = iter(range(1 << 30))


def _text(seed: int, tokens: int) -> str:
    """A prompt of about `tokens` tokens that no other call of this run starts with."""
    import random

    rng = random.Random(seed * 7919 + next(_rounds))
    return " ".join(f"w{rng.randrange(10**6)}" for _ in range(tokens // 4))


def step_bytes(runner) -> int:
    """Weight bytes one decode step reads: every linear once (one copy of a packed layer) and the head."""
    from torch import nn

    from shared.packed_linear import PackedLinear
    from shared.quantize import Int8Linear

    total = 0
    for module in [*runner.text_model.layers.modules(), runner.lm_head]:
        if isinstance(module, PackedLinear):
            total += module.packed.numel() * module.packed.element_size()
        elif isinstance(module, Int8Linear):
            total += module.qweight.numel() + module.scale.numel() * module.scale.element_size()
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


def engine_for(model: Path, dtype, variant: str):
    from services.llm_decoder.engine import DecoderEngine

    parts = set(variant.split("+"))
    packed = next((p for p in parts if p in ("off", "head", "all")), "all")
    engine = DecoderEngine(model, dtype=dtype, quantize="int8" if "int8" in parts else "off", packed_linear=packed,
                           decode_attention="gather" if "gather" in parts else "auto")
    if parts & {"mv", "nomv"}:  # one-row bf16 calls forced to torch.mv / the packed GEMV (default: timed at load)
        from shared.packed_linear import PackedLinear

        for module in [*engine.runner.text_model.modules(), engine.runner.lm_head]:
            if isinstance(module, PackedLinear) and module.dense is not None:
                module.mv_one_row = "mv" in parts
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2_vl")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--dtype", default="auto", help="auto (the services' default), float32, bfloat16")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--new-tokens", type=int, default=17)
    parser.add_argument("--variants", default="all,int8",
                        help="comma-separated; each a +-joined packed_linear mode (off, head, all), int8, gather, nomv")
    parser.add_argument("--prompts", choices=("shared", "distinct"), default="shared")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import torch

    from services.vision_encoder.engine import VisionEngine
    from shared.hardware import resolve_dtype
    from shared.image_ids import image_id
    from shared.images import load_image

    model = args.model or ensure_model(args.family)
    dtype_name = resolve_dtype(args.dtype, "cpu").name
    dtype = getattr(torch, dtype_name)
    data = photo(1024, 1024)
    [payload] = VisionEngine(model, dtype=dtype).encode([load_image(data)])
    payload = payload.named(image_id(data))
    variants = args.variants.split(",")
    decoders = {v: engine_for(model, dtype, v) for v in variants}
    for decoder in decoders.values():
        decode_ms(decoder, payload, image_id(data), 2, 3)  # warm-up; the image prefix is cached from here on
    bandwidth = read_bandwidth_gbs()
    floors = {v: step_bytes(d.runner) / bandwidth / 1e6 for v, d in decoders.items()}
    prompts = ("one image prefix shared by every row" if args.prompts == "shared"
               else "distinct text prompts (nothing shared)")
    print(f"{model.name}, {dtype_name}, {prompts}, ~{payload.n_tokens} prompt tokens, torch threads "
          f"{torch.get_num_threads()}; decode attention: "
          + ", ".join(f"{v} {d.runner.decode_attention}" for v, d in decoders.items()))
    print(f"CPU: {machine()}; memory read bandwidth {bandwidth:.1f} GB/s")
    print("floor ms/step (weights read once / bandwidth): "
          + ", ".join(f"{v} {floors[v]:.1f} ({step_bytes(d.runner) / 2**20:.0f} MiB)" for v, d in decoders.items()))
    print(f"{'rows':>6}" + "".join(f"{'ms/step ' + v:>18}" for v in variants) + f"{'steps':>7}"
          + "".join(f"{'1-row/floor ' + v:>18}" for v in variants))
    for rows in (int(b) for b in args.batches.split(",")):
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for variant, decoder in decoders.items():
                ms, steps = decode_ms(decoder, payload, image_id(data), rows, args.new_tokens, args.prompts == "distinct")
                times[variant].append(ms)
        ratios = "".join(f"{min(times[v]) / floors[v]:>18.2f}" for v in variants) if rows == 1 else ""
        print(f"{rows:>6}" + "".join(f"{min(v):>10.1f}-{max(v):<7.1f}" for v in times.values()) + f"{steps:>7}" + ratios)


if __name__ == "__main__":
    main()
