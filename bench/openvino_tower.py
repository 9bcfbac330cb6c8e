"""The encoder's OpenVINO backend against its torch tower, one 1024x1024 image, same run.

    .venv/bin/python bench/openvino_tower.py [--family qwen2_vl] [--dtype auto] [--rounds 3] [--size 1024]
    make bench-openvino

Engines (each a VisionEngine, as the encoder builds it; rounds alternate between them so a noisy machine
affects all alike): the torch tower in float32 (the exact reference) and in the serving dtype (`auto`: bf16
where the CPU has AMX / AVX-512 BF16, the encoder's default path), the OpenVINO backend in the serving
dtype with float32 weights and with nncf int8 weights. Each OpenVINO engine starts twice on an empty IR
cache: the first start converts (conversion + compile), the second loads the IR (the cached start every
replica after the first gets). Prints seconds per forward (min / median) and the first forward after start (OpenVINO repacks its weights
there, so a server's warm-up pays it before SERVING), start times, IR size on disk,
and each engine's embedding cosine against the torch float32 tower.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ensure_model, machine, photo  # noqa: E402


def timed(build):
    start = time.perf_counter()
    value = build()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2_vl")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    import openvino as ov
    import torch

    from services.vision_encoder.engine import VisionEngine
    from shared.hardware import resolve_dtype
    from shared.images import load_image

    model = args.model or ensure_model(args.family)
    dtype_name = resolve_dtype(args.dtype, "cpu").name
    dtype = getattr(torch, dtype_name)
    image = load_image(photo(args.size, args.size, seed=11))
    cache = Path(tempfile.mkdtemp(prefix="vlsplit-openvino-bench-"))
    engines, starts = {}, {}
    engines["torch float32 (reference)"] = VisionEngine(model, dtype=torch.float32)
    engines[f"torch {dtype_name} (default)"] = VisionEngine(model, dtype=dtype)
    for label, quantize in ((f"openvino {dtype_name}", "off"), (f"openvino {dtype_name}, nncf int8 weights", "int8")):
        build = lambda: VisionEngine(model, dtype=dtype, quantize=quantize, backend="openvino", openvino_cache_dir=cache)
        first, first_s = timed(build)
        engines[label], cached_s = timed(build)
        assert (first.openvino.source, engines[label].openvino.source) == ("converted", "cache")
        starts[label] = (first_s, cached_s, engines[label].weight_bytes())
        del first
    inputs = engines["torch float32 (reference)"].preprocess([image])
    times: dict[str, list[float]] = {label: [] for label in engines}
    outputs = {}
    with torch.inference_mode():
        first_forward = {}
        for label, e in engines.items():  # warm-up: OpenVINO repacks its weights in the first inference
            outputs[label], first_forward[label] = timed(lambda: e.encode_inputs(inputs)[0].embeddings.double())
        for _ in range(args.rounds):
            for label, e in engines.items():
                start = time.perf_counter()
                e.encode_inputs(inputs)
                times[label].append(time.perf_counter() - start)
    reference = outputs["torch float32 (reference)"]
    patches = inputs[0].pixel_values.shape[0]
    print(f"{model.name}, serving dtype {dtype_name}, {args.size}x{args.size} ({patches} patches), {args.rounds} rounds; "
          f"CPU: {machine()}; openvino {ov.__version__.split('-')[0]}")
    print("| engine | s per forward (min) | median | vs torch default (median) | first forward s | cosine vs torch fp32 |\n"
          "|---|---|---|---|---|---|")
    base = statistics.median(times[f"torch {dtype_name} (default)"])
    for label, t in times.items():
        cosine = torch.nn.functional.cosine_similarity(outputs[label].flatten(), reference.flatten(), dim=0)
        print(f"| {label} | {min(t):.2f} | {statistics.median(t):.2f} | {statistics.median(t) / base:.2f} | "
              f"{first_forward[label]:.2f} | {cosine:.5f} |")
    print("\n| OpenVINO engine | first start (convert + compile) s | cached start (IR + compile) s | IR weights MiB |\n|---|---|---|---|")
    for label, (first_s, cached_s, size) in starts.items():
        print(f"| {label} | {first_s:.1f} | {cached_s:.1f} | {size / (1 << 20):.0f} |")


if __name__ == "__main__":
    main()
