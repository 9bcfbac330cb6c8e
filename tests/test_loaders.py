"""Checkpoint loading: each engine reads only its own tensors, from any layout, sharded or not,
in the serving dtype, and refuses a checkpoint that does not match the model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import shared.checkpoint as checkpoint_module
from conftest import make_image
from reference import reference_tokens
from services.model_builder import make_model
from services.llm_decoder.engine import DecoderEngine, GenerationInput
from shared.sampling import SamplingParams
from services.vision_encoder.engine import VisionEngine
from shared.errors import CheckpointError
from shared.families import get_family
from shared.images import load_image
from shared.schema import question_messages

QUESTION = "What is in this picture?"
VISUAL = ("visual.", "model.visual.")
MAX_NEW_TOKENS = 10


def stored_names(path: str | Path) -> set[str]:
    """Every tensor name in the checkpoint, read from the files themselves (not via Checkpoint)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return set(f.keys())


def split_tokens(path, images=None, dtype=torch.float32):
    images = images or [load_image(make_image(320, 240, seed=1))]
    encoder, decoder = VisionEngine(path, dtype=dtype), DecoderEngine(path, dtype=dtype)
    payloads = encoder.encode(images)
    request = GenerationInput(question_messages(QUESTION, len(images)), payloads,
                                SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
    tokens = [e.token_id for e in decoder.generate(request) if e.token_id is not None]
    return tokens, payloads


def rewrite_tensors(path: Path, edit) -> None:
    """Apply `edit(state)` to a single-file checkpoint's tensors and write them back."""
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def edit_config(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[tuple[str, str], str]:
    """(family, variant) -> checkpoint, all seed 0: the hub layout, the nested one, a sharded one."""
    root = tmp_path_factory.mktemp("loader-models")
    out = {}
    for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        out[family, "hub"] = str(make_model(root / f"{family}-hub", family, seed=0, layout="hub"))
        out[family, "nested"] = str(make_model(root / f"{family}-nested", family, seed=0, layout="nested"))
        out[family, "sharded"] = str(make_model(root / f"{family}-sharded", family, seed=0,
                                                max_shard_size=200_000))
    return out


@pytest.fixture
def copy_of(tmp_path):
    def copy(path) -> Path:
        dst = tmp_path / Path(path).name
        shutil.copytree(path, dst)
        return dst
    return copy


# ---- what each engine reads ------------------------------------------------------------------


class RecordingSafeOpen:
    """Stands in for `safe_open`: every tensor fetched through any handle is recorded."""

    def __init__(self):
        self.names: list[str] = []

    def __call__(self, *args, **kwargs):
        return _RecordingHandle(safe_open(*args, **kwargs), self.names)


class _RecordingHandle:
    def __init__(self, handle, names):
        self._handle, self._names = handle, names

    def __enter__(self):
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)

    def get_tensor(self, name):
        self._names.append(name)
        return self._handle.get_tensor(name)

    def get_slice(self, name):
        self._names.append(name)
        return self._handle.get_slice(name)

    def __getattr__(self, attr):
        return getattr(self._handle, attr)


@pytest.fixture
def recorder(monkeypatch) -> RecordingSafeOpen:
    recorder = RecordingSafeOpen()
    monkeypatch.setattr(checkpoint_module, "safe_open", recorder)
    return recorder


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_encoder_reads_every_visual_tensor_and_nothing_else(tiny_model, variants, recorder, kind):
    path = tiny_model if kind == "single" else variants[get_family_of(tiny_model), "sharded"]
    all_names = stored_names(path)
    visual = {n for n in all_names if n.startswith(VISUAL)}
    assert visual and visual != all_names

    engine = VisionEngine(path)

    assert set(engine.checkpoint.reads) == visual
    assert len(engine.checkpoint.reads) == len(visual)  # each read once
    assert set(recorder.names) == visual  # what safetensors actually handed out
    assert len(recorder.names) == len(visual)


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_decoder_reads_every_language_tensor_and_no_visual_one(tiny_model, variants, recorder, kind):
    path = tiny_model if kind == "single" else variants[get_family_of(tiny_model), "sharded"]
    all_names = stored_names(path)
    language = {n for n in all_names if not n.startswith(VISUAL)}

    engine = DecoderEngine(path)

    assert set(engine.checkpoint.reads) == language
    assert set(recorder.names) == language
    assert not [n for n in recorder.names if n.startswith(VISUAL)]


def get_family_of(path: str) -> str:
    return json.loads((Path(path) / "config.json").read_text())["model_type"]


# ---- key layouts and shards --------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_hub_and_nested_layouts_give_identical_embeddings_and_tokens(variants, family):
    hub, nested = variants[family, "hub"], variants[family, "nested"]
    assert stored_names(hub) != stored_names(nested)  # the layouts really differ

    hub_tokens, hub_payloads = split_tokens(hub)
    nested_tokens, nested_payloads = split_tokens(nested)

    assert torch.equal(hub_payloads[0].embeddings, nested_payloads[0].embeddings)
    assert hub_tokens == nested_tokens
    assert len(hub_tokens) > 0


def test_qwen3_hub_layout_is_the_nested_layout(variants):
    hub, nested = variants["qwen3_vl", "hub"], variants["qwen3_vl", "nested"]
    assert (Path(hub) / "model.safetensors").read_bytes() == (Path(nested) / "model.safetensors").read_bytes()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_reference_model_loads_both_layouts_completely(variants, family):
    images = [load_image(make_image(320, 240, seed=1))]
    ours, _ = split_tokens(variants[family, "hub"], images)
    for layout in ("hub", "nested"):
        path = variants[family, layout]
        _, info = get_family(family).model_class.from_pretrained(path, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (layout, info)
        assert reference_tokens(path, images, QUESTION, max_new_tokens=MAX_NEW_TOKENS) == ours


def test_sharded_checkpoint_loads_and_generates_like_single_file(tiny_model, variants):
    sharded = Path(variants[get_family_of(tiny_model), "sharded"])
    shards = sorted(sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    assert (sharded / "model.safetensors.index.json").is_file()
    assert not (sharded / "model.safetensors").exists()

    single_tokens, single_payloads = split_tokens(tiny_model)
    sharded_tokens, sharded_payloads = split_tokens(sharded)

    assert torch.equal(single_payloads[0].embeddings, sharded_payloads[0].embeddings)
    assert sharded_tokens == single_tokens


# ---- serving dtype ---------------------------------------------------------------------------


def test_bf16_engines_keep_rotary_frequencies_in_float32(tiny_model):
    encoder = VisionEngine(tiny_model, dtype=torch.bfloat16)
    decoder = DecoderEngine(tiny_model, dtype=torch.bfloat16)

    for module in (encoder.tower, decoder.runner.text_model, decoder.runner.lm_head):
        tensors = [*module.parameters(), *(getattr(m, "packed", None) for m in module.modules())]
        assert {t.dtype for t in tensors if t is not None} == {torch.bfloat16}
    for module in (encoder.tower, decoder.runner.text_model):
        inv_freq = {name: b.dtype for name, b in module.named_buffers() if "inv_freq" in name}
        assert inv_freq, f"{type(module).__name__} has no inv_freq buffer"
        assert set(inv_freq.values()) == {torch.float32}, inv_freq

    tokens, payloads = split_tokens(tiny_model, dtype=torch.bfloat16)
    assert payloads[0].embeddings.dtype == torch.bfloat16
    assert len(tokens) > 0


# ---- strict loading --------------------------------------------------------------------------


def first_visual(path) -> str:
    return sorted(n for n in stored_names(path) if n.startswith(VISUAL))[0]


def test_missing_visual_tensor_is_named(tiny_model, copy_of):
    path = copy_of(tiny_model)
    name = first_visual(path)
    rewrite_tensors(path, lambda state: state.pop(name))

    with pytest.raises(CheckpointError, match="missing") as err:
        VisionEngine(path)
    inner = name.removeprefix("model.").removeprefix("visual.")
    assert inner in str(err.value)


def test_unexpected_visual_tensor_is_refused(tiny_model, copy_of):
    path = copy_of(tiny_model)
    prefix = first_visual(path).split("visual.")[0] + "visual."
    rewrite_tensors(path, lambda state: state.update({prefix + "bogus.weight": torch.zeros(3)}))

    with pytest.raises(CheckpointError, match="unexpected") as err:
        VisionEngine(path)
    assert "bogus.weight" in str(err.value)


def test_missing_language_tensor_is_named(tiny_model, copy_of):
    path = copy_of(tiny_model)
    name = sorted(n for n in stored_names(path) if n.endswith("norm.weight") and not n.startswith(VISUAL))[-1]
    rewrite_tensors(path, lambda state: state.pop(name))

    with pytest.raises(CheckpointError, match="missing") as err:
        DecoderEngine(path)
    assert name.removeprefix("model.").removeprefix("language_model.") in str(err.value)


@pytest.mark.parametrize("engine", [VisionEngine, DecoderEngine])
def test_directory_without_config_is_refused(tiny_models, copy_of, engine):
    path = copy_of(tiny_models["qwen2_vl"])
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        engine(path)


@pytest.mark.parametrize("engine", [VisionEngine, DecoderEngine])
@pytest.mark.parametrize("model_type", ["llama", "bogus_vl"], ids=["known-to-transformers", "unknown"])
def test_unsupported_model_type_lists_supported_ones(tiny_models, copy_of, engine, model_type):
    path = copy_of(tiny_models["qwen2_vl"])
    edit_config(path, lambda config: config.update(model_type=model_type))
    with pytest.raises(CheckpointError) as err:
        engine(path)
    message = str(err.value)
    assert model_type in message
    assert all(f in message for f in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"))


# ---- tied and untied embeddings ----------------------------------------------------------------


def add_lm_head(path: Path, seed: int = 7) -> None:
    def edit(state):
        embed = next(t for n, t in state.items() if n.endswith("embed_tokens.weight"))
        assert "lm_head.weight" not in state  # tiny models are tied
        generator = torch.Generator().manual_seed(seed)
        state["lm_head.weight"] = 0.1 * torch.randn(embed.shape, generator=generator)
    rewrite_tensors(path, edit)


def untie(config: dict) -> None:
    config["tie_word_embeddings"] = False
    if "text_config" in config:
        config["text_config"]["tie_word_embeddings"] = False


def test_untied_head_is_used_and_matches_reference(tiny_model, copy_of):
    path = copy_of(tiny_model)
    edit_config(path, untie)
    add_lm_head(path)
    images = [load_image(make_image(320, 240, seed=1))]

    ours, _ = split_tokens(path, images)
    decoder = DecoderEngine(path, packed_linear="off")  # the dense head, to compare storage

    assert decoder.runner.lm_head.weight.data_ptr() != decoder.runner.text_model.embed_tokens.weight.data_ptr()
    assert ours == reference_tokens(str(path), images, QUESTION, max_new_tokens=MAX_NEW_TOKENS)
    assert ours != split_tokens(tiny_model, images)[0]  # the head really changed the answer


def test_stored_head_wins_over_a_tied_config_as_in_transformers(tiny_model, copy_of):
    """transformers unties a tied config whose checkpoint stores a different head; so must we."""
    path = copy_of(tiny_model)
    add_lm_head(path)
    images = [load_image(make_image(320, 240, seed=1))]

    ours, _ = split_tokens(path, images)

    assert ours == reference_tokens(str(path), images, QUESTION, max_new_tokens=MAX_NEW_TOKENS)


def test_untied_config_without_head_is_refused(tiny_models, copy_of):
    path = copy_of(tiny_models["qwen2_vl"])
    edit_config(path, untie)
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        DecoderEngine(path)
