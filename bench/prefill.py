"""Prefill of one image prompt (the 1,397 tokens of a 1024x1024 image and a question with Qwen2-VL-2B's
processor): the decoder engine at several chunk sizes (`max_step_tokens`) against the monolithic
transformers model's forward over the same prompt, same run, rounds alternating.

    .venv/bin/python bench/prefill.py [--family qwen2_vl] [--dtype auto] [--chunks 512,1024,2048] [--rounds 3]

The engine's time is the sum of its prefill steps (its own step records) for a prompt whose image
embeddings arrive as a payload, with prefix caching off (every round prefills the whole prompt). The monolithic number
is one `model(**inputs)` forward with the embeddings passed in (`mm_encoder_outputs`), logits of the
last position only. vLLM's prefill is measured by `make bench-peer` (workload P).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ensure_model, machine, photo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2_vl")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--chunks", default="512,1024,2048")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import torch
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from services.llm_decoder.engine import DecoderEngine, GenerationInput
    from services.vision_encoder.engine import VisionEngine
    from shared.families import get_family
    from shared.hardware import resolve_dtype
    from shared.image_ids import image_id
    from shared.images import load_image
    from shared.schema import question_messages
    from shared.sampling import SamplingParams

    model = args.model or ensure_model(args.family)
    dtype_name = resolve_dtype(args.dtype, "cpu").name
    dtype = getattr(torch, dtype_name)
    data = photo(1024, 1024)
    img = load_image(data)
    encoder = VisionEngine(model, dtype=dtype)
    [payload] = encoder.encode([img])
    payload = payload.named(image_id(data))
    chunks = [int(c) for c in args.chunks.split(",")]
    engines = {c: DecoderEngine(model, dtype=dtype, max_step_tokens=c, prefix_caching=False,
                                decode_attention="auto") for c in chunks}

    def engine_prefill(engine, question: str) -> tuple[float, int]:
        request = GenerationInput(question_messages(question), [payload], SamplingParams(max_new_tokens=1),
                                    (payload.image_id,))
        start = len(engine.stats.records)
        for _ in engine.generate(request):
            pass
        records = [r for r in list(engine.stats.records)[start:] if r.prefill]
        return sum(r.seconds for r in records), sum(sum(r.prefill.values()) for r in records)

    from transformers import AutoConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from reference import reference_inputs  # the equivalence tests' monolithic inputs (no torchvision needed)

    family = get_family(AutoConfig.from_pretrained(model).model_type)
    mono = family.model_class.from_pretrained(model, dtype=dtype, attn_implementation="sdpa").eval()

    @torch.inference_mode()
    def mono_prefill(question: str) -> tuple[float, int]:
        inputs = reference_inputs(str(model), [img], question)
        inputs.pop("pixel_values")
        out = BaseModelOutputWithPooling(pooler_output=(payload.embeddings.to(dtype),))
        start = time.perf_counter()
        mono(**inputs, mm_encoder_outputs={"image": out}, logits_to_keep=1)
        return time.perf_counter() - start, inputs["input_ids"].shape[1]

    times: dict[str, list[float]] = {f"engine, chunk {c}": [] for c in chunks} | {"monolithic forward": []}
    tokens = 0
    for r in range(args.rounds + 1):  # round 0 warms every path up (and compiles the paged kernel's shapes)
        for c, engine in engines.items():
            seconds, tokens = engine_prefill(engine, f"Round {r}, chunk {c}: what is shown?")
            if r:
                times[f"engine, chunk {c}"].append(seconds)
        seconds, _ = mono_prefill(f"Round {r}: what is shown?")
        if r:
            times["monolithic forward"].append(seconds)
    print(f"{model.name}, {dtype_name}, one image prompt of {tokens} tokens, torch threads {torch.get_num_threads()}")
    print(f"CPU: {machine()}")
    base = min(times["monolithic forward"])
    print(f"{'path':<22}{'min s':>8}{'median s':>10}{'tokens/s':>10}{'vs monolithic':>15}")
    for name, t in times.items():
        print(f"{name:<22}{min(t):>8.3f}{statistics.median(t):>10.3f}{tokens / min(t):>10.0f}{min(t) / base:>15.2f}")


if __name__ == "__main__":
    main()
