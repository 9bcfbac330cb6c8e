"""`vlsplit make-model`: write a complete random-weight Qwen-VL checkpoint, offline.

The result is a Hugging Face-layout directory (config.json, safetensors, tokenizer, chat template,
preprocessor_config.json, generation_config.json) that both our services and
`*ForConditionalGeneration.from_pretrained` load. Weights are random but deterministic for a seed;
their text output is meaningless. `tiny` is for tests; `bench` has the family's smallest real
checkpoint's widths and vocabulary with only a few layers, for benchmarks.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm
from safetensors.torch import save_file
from transformers.initialization import no_init_weights

from shared.families import get_family
from shared.families.base import Family
from shared.video import VIDEO_CONFIG
from services.model_builder import RANDOM_MARKER
from services.model_builder.tokenizer import SPECIAL_TOKENS, build_tokenizer, save_tokenizer

log = logging.getLogger("vlsplit.make_model")

VOCAB = {"tiny": "tiny", "bench": "qwen"}
BENCH_VOCAB_SIZE = 151936  # the padded embedding size of every real Qwen2/2.5/3-VL checkpoint
SAVE_DTYPE = {"tiny": torch.float32, "bench": torch.bfloat16}
LAYOUTS = ("hub", "nested")
ATTENTION_SHARPNESS = 3.0


def make_model(
    out_dir: str | Path,
    family: str,
    size: str = "tiny",
    seed: int = 0,
    layout: str = "hub",
    max_shard_size: int | None = None,
) -> Path:
    """Build the checkpoint in `out_dir` and return its path.

    layout: "hub" stores tensors as the family's published checkpoints do (Qwen2/2.5-VL:
    `visual.*` + `model.*`; Qwen3-VL: `model.visual.*` + `model.language_model.*`); "nested" always
    uses the transformers-5 layout. max_shard_size (bytes) writes a sharded index.
    """
    fam = get_family(family)
    if size not in fam.sizes:
        raise ValueError(f"size must be one of {sorted(fam.sizes)}, got {size!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    tokenizer = build_tokenizer(family, VOCAB[size])
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS[family]}
    vocab_size = BENCH_VOCAB_SIZE if size == "bench" else len(tokenizer)
    config_dict = fam.hub_config(fam.sizes[size], ids, vocab_size)
    config_dict["torch_dtype"] = str(SAVE_DTYPE[size]).removeprefix("torch.")

    state = _random_state(fam, config_dict, seed)
    state = {_rename(name, fam, layout): t.to(SAVE_DTYPE[size]).contiguous() for name, t in state.items()}
    _save_tensors(state, out, max_shard_size)

    _write_json(out / "config.json", config_dict)
    _write_json(out / "preprocessor_config.json", _preprocessor_config(fam))
    _write_json(out / VIDEO_CONFIG, _video_config(fam))
    _write_json(out / "generation_config.json", _generation_config(ids))
    save_tokenizer(tokenizer, out, family)
    _write_json(out / RANDOM_MARKER, {"family": family, "size": size, "seed": seed, "layout": layout,
                                      "note": "random weights: generated text is meaningless"})
    log.info("wrote %s %s checkpoint to %s in %.1fs", size, family, out, time.perf_counter() - start)
    return out


def _random_state(fam: Family, config_dict: dict, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random weights of the monolithic model, in transformers-5 (nested) names."""
    config = fam.config_class(**config_dict)
    with no_init_weights():
        model = fam.model_class._from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    tensors = model.state_dict().items()
    # a bar on a terminal: a bench checkpoint is hundreds of MB of random numbers
    state = {name: _random_like(name, p, generator)
             for name, p in tqdm(tensors, desc="random weights", unit="tensor", disable=None, leave=False)}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied checkpoints do not store the head
    return state


def _random_like(name: str, param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random weights that keep a random model's answer sensitive to its inputs.

    transformers' own init (std 0.02) gives random models whose greedy output is one token repeated
    whatever the image, which would make the equivalence oracle blind. Here: fan-in-scaled
    matrices (unit-scale activations), small token embeddings (so tied logits are not dominated by
    the input token), and queries/keys scaled up by ATTENTION_SHARPNESS (through q/k_norm where
    the family normalises them) so attention picks tokens instead of averaging them all.
    """
    sharp = any(part in name for part in ("q_proj", "k_proj", "q_norm", "k_norm"))
    scale = ATTENTION_SHARPNESS if sharp else 1.0
    noise = torch.randn(param.shape, generator=generator)
    if param.ndim == 1:  # norm weights near their scale, biases near 0
        return (scale if name.endswith("weight") else 0.0) + 0.1 * noise
    if "embed_tokens" in name:
        return 0.1 * noise
    if "pos_embed" in name:
        return noise
    return scale * noise / param[0].numel() ** 0.5


def _rename(name: str, fam: Family, layout: str) -> str:
    if layout == "nested" or fam.model_type == "qwen3_vl":
        return name
    if name.startswith("model.visual."):
        return name.removeprefix("model.")
    if name.startswith("model.language_model."):
        return "model." + name.removeprefix("model.language_model.")
    return name


def _save_tensors(state: dict[str, torch.Tensor], out: Path, max_shard_size: int | None) -> None:
    metadata = {"format": "pt"}
    if max_shard_size is None:
        save_file(state, out / "model.safetensors", metadata=metadata)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and used + nbytes > max_shard_size:
            shards.append({})
            used = 0
        shards[-1][name] = tensor
        used += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / file, metadata=metadata)
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _preprocessor_config(fam: Family) -> dict:
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "resample": 3,
        "rescale_factor": 1 / 255,
        **fam.preprocessor,
    }


def _video_config(fam: Family) -> dict:
    return {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True, "resample": 3,
            "rescale_factor": 1 / 255, **fam.video.defaults,
            "processor_class": fam.preprocessor["processor_class"]}


def _generation_config(ids: dict[str, int]) -> dict:
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "do_sample": False,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
