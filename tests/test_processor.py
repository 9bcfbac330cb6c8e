"""Our processor pieces produce exactly what transformers' Qwen-VL processor would, and refuse
what it cannot handle with typed errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoImageProcessor

from conftest import make_image
from reference import reference_inputs
from shared.errors import BadImage, InvalidRequest
from shared.families import get_family
from shared.images import load_image
from shared.processor import ImagePreprocessor, PromptBuilder, validate_messages
from shared.schema import question_messages

QUESTION = "What is in this picture? Describe it."
SIZES = [(320, 240), (1, 1), (2000, 60), (60, 2000), (997, 13), (1024, 1024)]


def image(width, height, seed=0):
    return load_image(make_image(width, height, seed))


@pytest.fixture(scope="module")
def processors(tiny_models):
    out = {}
    for path in tiny_models.values():
        preprocess = ImagePreprocessor.from_pretrained(path)
        out[path] = (preprocess, PromptBuilder.from_pretrained(path, preprocess.merge_size))
    return out


def our_inputs(processors, path, images, question=QUESTION):
    preprocess, prompts = processors[path]
    vision = [preprocess(img) for img in images]
    return vision, prompts(question_messages(question, len(images)), [v.grid_thw for v in vision])


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_prompt_equals_reference_one_image(tiny_model, processors, size):
    images = [image(*size, seed=1)]
    _, ours = our_inputs(processors, tiny_model, images)
    ref = reference_inputs(tiny_model, images, QUESTION)

    assert torch.equal(ours.input_ids, ref["input_ids"][0])
    assert torch.equal(ours.mm_token_type_ids, ref["mm_token_type_ids"][0])
    assert int(ours.mm_token_type_ids.sum()) == int(ref["image_grid_thw"][0].prod()) // 4


@pytest.mark.parametrize("sizes", [[(256, 256), (400, 150)], [(1, 1), (2000, 60)]], ids=["square+wide", "tiny+wide"])
def test_prompt_equals_reference_two_images(tiny_model, processors, sizes):
    images = [image(*s, seed=i) for i, s in enumerate(sizes)]
    vision, ours = our_inputs(processors, tiny_model, images, "Compare the two pictures.")
    ref = reference_inputs(tiny_model, images, "Compare the two pictures.")

    assert torch.equal(ours.input_ids, ref["input_ids"][0])
    assert torch.equal(ours.mm_token_type_ids, ref["mm_token_type_ids"][0])
    assert [v.grid_thw for v in vision] == [tuple(g.tolist()) for g in ref["image_grid_thw"]]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pixels_equal_transformers_image_processor(tiny_model, processors, size):
    img = image(*size, seed=2)
    ours = processors[tiny_model][0](img)
    ref = AutoImageProcessor.from_pretrained(tiny_model)(images=[img], return_tensors="pt")

    assert ours.pixel_values.dtype == ref["pixel_values"].dtype
    assert torch.equal(ours.pixel_values, ref["pixel_values"])
    assert ours.grid_thw == tuple(ref["image_grid_thw"][0].tolist())


EXPECTED_PREPROCESSOR = {
    "qwen2_vl": dict(min_pixels=3136, max_pixels=12845056, patch_size=14,
                     image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711]),
    "qwen2_5_vl": dict(min_pixels=3136, max_pixels=12845056, patch_size=14,
                       image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711]),
    "qwen3_vl": dict(min_pixels=65536, max_pixels=16777216, patch_size=16,
                     image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
}


@pytest.mark.parametrize("family", sorted(EXPECTED_PREPROCESSOR))
def test_checkpoint_carries_published_preprocessor_values(tiny_models, processors, family):
    path = tiny_models[family]
    config = json.loads((Path(path) / "preprocessor_config.json").read_text())
    expected = {**EXPECTED_PREPROCESSOR[family], "temporal_patch_size": 2, "merge_size": 2,
                "image_processor_type": "Qwen2VLImageProcessor"}
    assert {k: config.get(k) for k in expected} == expected
    assert config["processor_class"] == get_family(family).preprocessor["processor_class"]
    # and the loaded processor really uses them
    loaded = processors[path][0].image_processor
    assert (loaded.patch_size, loaded.merge_size, loaded.temporal_patch_size) == (expected["patch_size"], 2, 2)
    assert list(loaded.image_mean) == expected["image_mean"]
    assert list(loaded.image_std) == expected["image_std"]


@pytest.mark.parametrize("size", [(4000, 10), (10, 4000)], ids=["wide", "tall"])
def test_extreme_aspect_ratio_is_a_bad_image(tiny_model, processors, size):
    img = image(*size)  # decodes fine: only the processor refuses it
    with pytest.raises(BadImage, match=r"aspect ratio") as err:
        processors[tiny_model][0](img)
    assert f"{size[0]}x{size[1]}" in str(err.value)
    assert isinstance(err.value, InvalidRequest)


def test_aspect_ratio_just_under_the_limit_is_accepted(tiny_models, processors):
    path = tiny_models["qwen2_vl"]
    out = processors[path][0](image(4000, 21))
    assert out.grid_thw[0] == 1


# ---- message validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"role": "robot", "content": "hi"}], "role"),
        (["not a dict"], "role"),
        ([{"role": "user", "content": 5}], "content"),
        ([{"role": "user", "content": {"type": "text", "text": "hi"}}], "content"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "part"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "part"),
    ],
    ids=["empty", "not-a-list", "bad-role", "not-a-dict", "int-content", "dict-content", "audio-part",
         "non-str-text"],
)
def test_validate_messages_rejects(messages, fragment):
    with pytest.raises(InvalidRequest) as err:
        validate_messages(messages)
    assert fragment in str(err.value)


def test_validate_messages_accepts_a_conversation():
    validate_messages([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "text", "text": "Colour?"}]},
    ])


@pytest.mark.parametrize("n_images, n_grids", [(1, 2), (2, 1), (1, 0), (0, 1)])
def test_prompt_builder_refuses_image_grid_count_mismatch(tiny_model, processors, n_images, n_grids):
    prompts = processors[tiny_model][1]
    with pytest.raises(InvalidRequest, match=f"{n_images} images and clips but {n_grids}"):
        prompts(question_messages(QUESTION, n_images), [(1, 4, 4)] * n_grids)
