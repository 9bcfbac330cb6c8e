"""`make-model`: deterministic, complete, offline-loadable random checkpoints with the published
key layouts, and bench widths equal to the real checkpoints'."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from services.model_builder import make_model
from shared.families import FAMILIES, get_family
from services.model_builder.tokenizer import SPECIAL_TOKENS

FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
         "preprocessor_config.json", "generation_config.json", "vlsplit_random_weights.json",
         "model.safetensors")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tensor_names(path) -> list[str]:
    with safe_open(Path(path) / "model.safetensors", framework="pt") as f:
        return list(f.keys())


# ---- determinism and contents ----------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_same_seed_gives_identical_weights_and_other_seed_differs(tiny_models, tmp_path, family):
    again = make_model(tmp_path / "again", family, "tiny", seed=0)
    other = make_model(tmp_path / "other", family, "tiny", seed=1)
    original = Path(tiny_models[family]) / "model.safetensors"

    assert sha256(again / "model.safetensors") == sha256(original)
    assert sha256(other / "model.safetensors") != sha256(original)
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json"):  # independent of the seed
        assert (again / name).read_bytes() == (Path(tiny_models[family]) / name).read_bytes()


def test_tiny_checkpoint_is_complete_and_small(tiny_model):
    path = Path(tiny_model)
    for name in FILES:
        assert (path / name).is_file(), name
    total = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    assert total < 3_000_000
    marker = json.loads((path / "vlsplit_random_weights.json").read_text())
    assert marker["size"] == "tiny" and marker["seed"] == 0 and "meaningless" in marker["note"]


def test_tiny_checkpoint_loads_offline_with_transformers(tiny_model):
    config = AutoConfig.from_pretrained(tiny_model, local_files_only=True)
    family = get_family(config.model_type)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model, local_files_only=True)
    model, info = family.model_class.from_pretrained(tiny_model, local_files_only=True, output_loading_info=True)

    assert type(model) is family.model_class
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.text_config.vocab_size == len(tokenizer)
    text = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                         tokenize=False, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text


# ---- key layouts ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nested_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("nested-models")
    return {f: str(make_model(root / f, f, "tiny", seed=0, layout="nested")) for f in FAMILIES}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen2_hub_layout_uses_legacy_keys(tiny_models, family):
    names = tensor_names(tiny_models[family])
    assert all(n.startswith(("visual.", "model.")) for n in names), names
    assert not [n for n in names if n.startswith(("model.language_model.", "model.visual."))]
    assert any(n.startswith("visual.") for n in names)
    assert any(n.startswith("model.layers.") for n in names)
    assert "lm_head.weight" not in names  # tied


def test_qwen3_hub_layout_is_nested(tiny_models):
    names = tensor_names(tiny_models["qwen3_vl"])
    assert all(n.startswith(("model.visual.", "model.language_model.")) for n in names), names
    assert any(n.startswith("model.visual.") for n in names)
    assert "lm_head.weight" not in names


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_nested_layout_keys(tiny_models, nested_models, family):
    names = tensor_names(nested_models[family])
    assert all(n.startswith(("model.visual.", "model.language_model.")) for n in names), names
    assert any(n.startswith("model.visual.") for n in names)
    assert len(names) == len(tensor_names(tiny_models[family]))  # same tensors, renamed


# ---- the command line ------------------------------------------------------------------------------


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "vlsplit.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_make_model_writes_checkpoint_and_warns(tmp_path, tiny_models):
    out = tmp_path / "cli-model"
    result = run_cli("make-model", str(out), "--family", "qwen2_vl")

    assert result.returncode == 0, result.stderr
    assert "RANDOM weights" in result.stdout and "meaningless" in result.stdout
    assert sha256(out / "model.safetensors") == sha256(Path(tiny_models["qwen2_vl"]) / "model.safetensors")


def test_cli_make_model_refuses_unknown_family(tmp_path):
    result = run_cli("make-model", str(tmp_path / "x"), "--family", "bogus")

    assert result.returncode == 2
    assert "invalid choice" in result.stderr and "bogus" in result.stderr
    assert not (tmp_path / "x").exists()


# ---- bench widths --------------------------------------------------------------------------------

# Published config.json values of the smallest real checkpoint of each family.
REAL_WIDTHS = {
    "qwen2_vl": (  # Qwen2-VL-2B-Instruct
        dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2),
        dict(embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=1536),
    ),
    "qwen2_5_vl": (  # Qwen2.5-VL-3B-Instruct
        dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2),
        dict(hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048),
    ),
    "qwen3_vl": (  # Qwen3-VL-2B-Instruct
        dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8, head_dim=128),
        dict(hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048),
    ),
}


@pytest.mark.parametrize("family", sorted(REAL_WIDTHS))
def test_bench_widths_are_the_real_checkpoints(family):
    fam = get_family(family)
    text, vision = REAL_WIDTHS[family]
    bench = fam.sizes["bench"]
    assert {k: bench.text.get(k) for k in text} == text
    assert {k: bench.vision.get(k) for k in vision} == vision

    # ... and they reach the config the checkpoint is built from
    ids = {tok: 151643 + i for i, tok in enumerate(SPECIAL_TOKENS[family])}
    config = fam.config_class(**fam.hub_config(bench, ids, 151936))
    assert {k: getattr(config.text_config, k) for k in text} == text
    assert {k: getattr(config.vision_config, k) for k in vision} == vision
    head_dim = text.get("head_dim", text["hidden_size"] // text["num_attention_heads"])
    assert sum(bench.text["mrope_section"]) == head_dim // 2
    assert config.image_token_id == 151655


@pytest.mark.slow
def test_bench_checkpoint_has_real_vocabulary(tmp_path):
    path = make_model(tmp_path / "bench", "qwen2_vl", "bench", seed=0)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)

    assert config.text_config.vocab_size == 151936
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert config.image_token_id == 151655
    with safe_open(path / "model.safetensors", framework="pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [151936, 1536]
