"""The vision tower's levers, one at a time, on one 1024x1024 image (5,476 patches), in one run.

    .venv/bin/python bench/tower.py [--family qwen2_vl] [--dtype auto] [--rounds 5] [--size 1024]

Variants (each its own VisionEngine, rounds alternating between them so a noisy machine affects all
alike; seconds per forward, min and median):
  plain        transformers' tower (with the linear patch embedding, which is older than this table)
  rotary       + the rotary embedding on q and k together (fast_ops.use_fast_rotary; bit-identical)
  fused        + each MLP activation fused into its first GEMM (fast_ops.fuse_mlp_activations; bf16)
               = what the encoder serves by default
  int8         the default with int8 weights (--quantize int8)
plus the preprocessing of the image (resize, normalise, patchify), which runs before the forward.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ensure_model, machine, photo  # noqa: E402


def engine(model: Path, dtype, variant: str):
    from services.vision_encoder import engine as module

    off = {"plain": ("use_fast_rotary", "fuse_mlp_activations"), "rotary": ("fuse_mlp_activations",)}.get(variant, ())
    with contextlib.ExitStack() as levers:
        for name in off:  # switch the lever off
            levers.enter_context(mock.patch.object(module, name, lambda *a: 0))
        return module.VisionEngine(model, dtype=dtype, quantize="int8" if variant == "int8" else "off")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2_vl")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    import torch

    from shared.hardware import resolve_dtype
    from shared.images import load_image

    model = args.model or ensure_model(args.family)
    dtype_name = resolve_dtype(args.dtype, "cpu").name
    image = load_image(photo(args.size, args.size, seed=11))
    variants = ["plain", "rotary", "fused", "int8"]
    engines = {v: engine(model, getattr(torch, dtype_name), v) for v in variants}
    inputs = engines["plain"].preprocess([image])
    times: dict[str, list[float]] = {v: [] for v in [*variants, "preprocess"]}
    with torch.inference_mode():
        for e in engines.values():
            e.encode_inputs(inputs)  # warm-up
        for _ in range(args.rounds):
            for v, e in engines.items():
                start = time.perf_counter()
                e.encode_inputs(inputs)
                times[v].append(time.perf_counter() - start)
            start = time.perf_counter()
            engines["plain"].preprocess([image])
            times["preprocess"].append(time.perf_counter() - start)
    patches = inputs[0].pixel_values.shape[0]
    print(f"{model.name}, {dtype_name}, {args.size}x{args.size} ({patches} patches), {args.rounds} rounds; CPU: {machine()}")
    print("| variant | s per forward (min) | median | vs plain (median) |\n|---|---|---|---|")
    base = statistics.median(times["plain"])
    for v, t in times.items():
        print(f"| {v} | {min(t):.3f} | {statistics.median(t):.3f} | {statistics.median(t) / base:.2f} |")


if __name__ == "__main__":
    main()
