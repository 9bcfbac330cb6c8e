"""Shared by the benchmarks: bench checkpoints, test images, and the monolithic baseline."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def ensure_model(family: str) -> Path:
    """The family's `bench` checkpoint under .cache/models/, built once (in a child process, so this
    process's peak RSS stays honest)."""
    path = ROOT / ".cache" / "models" / f"bench-{family}"
    if not (path / "config.json").is_file():
        print(f"building bench {family} checkpoint in {path} (one-off)...", flush=True)
        subprocess.run([sys.executable, "-m", "vlsplit.cli", "make-model", str(path), "--family", family,
                        "--size", "bench"], check=True)
    return path


def machine() -> str:
    """The CPU model and ISA, for every table's header (bf16 is native only with AMX / AVX-512 BF16)."""
    from shared.hardware import cpu_features, usable_cpus

    return f"{cpu_features().describe()}, {usable_cpus()} usable CPUs, torch {torch.__version__}"


def read_bandwidth_gbs(mib: int = 1024) -> float:
    """This machine's memory read bandwidth (GB/s, best of 5 sums over `mib` MiB): the decode floor's divisor."""
    data = torch.ones(mib << 18, dtype=torch.float32)  # 4-byte elements
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def photo(width: int, height: int, seed: int = 0) -> bytes:
    """A deterministic JPEG with smooth structure and some texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(6 * x + seed), np.cos(5 * y), np.sin(4 * (x + y))], -1) * 100 + 128
    pixels = np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class FirstTokenTimer:
    """A `generate(streamer=...)` hook that notes when the first new token arrives."""

    def __init__(self):
        self.calls = 0
        self.first: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 is the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


class Monolithic:
    """The baseline: `*ForConditionalGeneration` re-encoding the image for every question."""

    def __init__(self, path: Path, dtype: torch.dtype):
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        from shared.families import get_family

        family = get_family(AutoConfig.from_pretrained(path).model_type)
        self.model = family.model_class.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_processor = AutoImageProcessor.from_pretrained(path)

    def inputs(self, image: Image.Image, question: str) -> dict:
        content = [{"type": "image"}, {"type": "text", "text": question}]
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)
        vision = self.image_processor(images=[image], return_tensors="pt")
        n = int(vision["image_grid_thw"][0].prod()) // self.image_processor.merge_size ** 2
        ids = self.tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * n), return_tensors="pt",
                             add_special_tokens=False)["input_ids"]
        pad = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == pad).long(),
                "pixel_values": vision["pixel_values"].to(self.model.dtype), "image_grid_thw": vision["image_grid_thw"]}

    @torch.inference_mode()
    def ask(self, image_bytes: bytes, question: str, max_new_tokens: int) -> dict:
        """One question from the image bytes, as a monolithic server would: decode, process, generate."""
        from shared.images import load_image

        start = time.perf_counter()
        inputs = self.inputs(load_image(image_bytes), question)
        timer = FirstTokenTimer()
        out = self.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, streamer=timer)
        end = time.perf_counter()
        tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
        return {"token_ids": tokens, "ttft_ms": ((timer.first or end) - start) * 1000,
                "total_ms": (end - start) * 1000}

    @torch.inference_mode()
    def score(self, image_bytes: bytes, question: str, labels: list[str]) -> list[float]:
        """Summed label-token logprobs as a monolithic server would do it: one forward over the prompt
        scores every single-token label; a multi-token label needs a forward of its own."""
        from shared.images import load_image

        inputs = self.inputs(load_image(image_bytes), question)
        prompt_logprobs = torch.log_softmax(self.model(**inputs).logits[0, -1].float(), -1)
        out = []
        for label in labels:
            ids = self.tokenizer(label, return_tensors="pt", add_special_tokens=False)["input_ids"]
            if ids.shape[1] == 1:
                out.append(float(prompt_logprobs[ids[0, 0]]))
                continue
            full = torch.cat([inputs["input_ids"], ids], dim=1)
            logits = self.model(input_ids=full, attention_mask=torch.ones_like(full),
                                mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids)], 1),
                                pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]).logits
            logprobs = torch.log_softmax(logits[0, inputs["input_ids"].shape[1] - 1: -1].float(), -1)
            out.append(float(logprobs.gather(1, ids[0][:, None]).sum()))
        return out
