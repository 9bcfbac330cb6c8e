"""Load cost of the split services against the monolithic model, on a `bench` checkpoint.

Each load runs in a fresh child process, which reports its load time and peak RSS (total, and
above the process's RSS once torch/transformers are imported). Safetensors loads are lazy (mmap),
so "load" includes touching one element on every page of every weight: that is when the bytes are
really read and become resident, as they would be at the first request. Every side loads what it
needs to serve: the encoder its image processor, the decoder its tokenizer, the monolithic model
both. Prints the encoder-only and decoder-only numbers as ratios of the monolithic
`*ForConditionalGeneration.from_pretrained`.

    .venv/bin/python bench/load.py [--family qwen2_vl] [--model DIR] [--dtype bfloat16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ensure_model  # noqa: E402
MODES = ("encoder", "decoder", "monolithic")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(mode: str, model: str, dtype_name: str) -> None:
    import torch
    from transformers import AutoConfig

    from services.llm_decoder.engine import DecoderEngine
    from services.vision_encoder.engine import VisionEngine
    from shared.families import get_family

    from transformers import AutoImageProcessor, AutoTokenizer

    dtype = getattr(torch, dtype_name)
    family = get_family(AutoConfig.from_pretrained(model).model_type)
    baseline = rss_mb()
    start = time.perf_counter()
    if mode == "encoder":
        obj = VisionEngine(model, dtype=dtype).tower
    elif mode == "decoder":
        engine = DecoderEngine(model, dtype=dtype)
        obj = torch.nn.ModuleList([engine.text_model, engine.lm_head])
    else:
        obj = family.model_class.from_pretrained(model, dtype=dtype, attn_implementation="sdpa")
        AutoTokenizer.from_pretrained(model), AutoImageProcessor.from_pretrained(model)
    touched = touch(obj)
    load_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"load_s": load_s, "peak_rss_mb": peak, "peak_over_imports_mb": peak - baseline,
                      "weights_mb": touched / 2**20}))


def touch(module) -> int:
    """Read one element per 4 KiB page of every parameter and buffer; return the bytes covered."""
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        flat = t.detach().reshape(-1)
        flat[:: max(1, 4096 // t.element_size())].float().sum().item()
        total += t.numel() * t.element_size()
    return total


def measure(mode: str, model: Path, dtype: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--model", str(model), "--dtype", dtype],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2_vl")
    parser.add_argument("--model", type=Path, help="checkpoint dir (default: build a bench checkpoint)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, str(args.model), args.dtype)
    model = args.model or ensure_model(args.family)
    size_mb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
    print(f"checkpoint {model} ({size_mb:.0f} MiB of safetensors), dtype {args.dtype}, best of {args.repeat}")
    results = {}
    for mode in MODES:
        runs = [measure(mode, model, args.dtype) for _ in range(args.repeat)]
        results[mode] = {k: min(r[k] for r in runs) for k in runs[0]}
    mono = results["monolithic"]
    print(f"{'load':<11}{'weights MiB':>12}{'time s':>8}{'peak RSS MiB':>14}{'over imports':>14}"
          f"{'time ratio':>12}{'RSS ratio':>11}")
    for mode, r in results.items():
        print(f"{mode:<11}{r['weights_mb']:>12.0f}{r['load_s']:>8.2f}{r['peak_rss_mb']:>14.0f}"
              f"{r['peak_over_imports_mb']:>14.0f}"
              f"{r['load_s'] / mono['load_s']:>12.2f}{r['peak_over_imports_mb'] / mono['peak_over_imports_mb']:>11.2f}")
    print(json.dumps({"model": str(model), "dtype": args.dtype, **results}))


if __name__ == "__main__":
    main()
