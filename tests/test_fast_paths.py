"""The CPU fast paths (oneDNN-packed decoder weights, the linear patch embedding) compute what the
plain modules compute, and greedy tokens through them equal the monolithic model's (fp32)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_image
from reference import reference_tokens
from services.llm_decoder.engine import DecoderEngine, GenerationRequest
from services.llm_decoder.packed_linear import DENSE_FROM_ROWS, PackedLinear, can_pack
from shared.sampling import SamplingParams
from services.vision_encoder.engine import VisionEngine
from services.vision_encoder.fast_ops import LinearPatchEmbed
from shared.checkpoint import Checkpoint
from shared.images import load_image
from shared.processor import question_messages

QUESTION = "What is in this picture? Describe it."


def test_onednn_packs_float32_on_this_cpu():
    # CI runs on x86 CPUs with oneDNN: the decoder's equivalence tests must exercise the packed path
    assert can_pack(torch.float32, torch.device("cpu"))
    assert not can_pack(torch.float32, torch.device("meta"))


@pytest.mark.parametrize("rows", [1, 7, DENSE_FROM_ROWS - 1, DENSE_FROM_ROWS, DENSE_FROM_ROWS + 45])
def test_packed_linear_equals_dense(rows):
    gen = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen)
    x = torch.randn(1, rows, 64, generator=gen)
    expected = torch.nn.functional.linear(x, weight, bias)

    both, packed_only = PackedLinear(weight, bias, dense=True), PackedLinear(weight, bias)

    torch.testing.assert_close(packed_only(x), expected, rtol=1e-5, atol=1e-5)
    if rows >= DENSE_FROM_ROWS:  # prefill-sized calls take the dense kernel: bit-identical
        assert torch.equal(both(x), expected)
    else:
        assert torch.equal(both(x), packed_only(x))


def generate(decoder: DecoderEngine, path: str, width: int, height: int) -> list[int]:
    encoder = VisionEngine(path)
    images = [load_image(make_image(width, height, seed=3))]
    request = GenerationRequest(question_messages(QUESTION, 1), encoder.encode(images),
                                SamplingParams(max_new_tokens=20))
    return [e.token_id for e in decoder.generate(request) if e.token_id is not None]


# 256x192: the whole prompt is one packed (oneDNN) call; 700x500: its prefill is dense-sized
@pytest.mark.parametrize("size", [(256, 192), (700, 500)], ids=["small-prompt", "long-prompt"])
def test_packed_decoder_equals_monolithic(tiny_model, size):
    packed, plain = DecoderEngine(tiny_model), DecoderEngine(tiny_model, packed_linear="off")
    layers = packed.runner.text_model.layers
    assert packed.runner.packed == "all" and isinstance(packed.runner.lm_head, PackedLinear)
    assert all(isinstance(layer.mlp.down_proj, PackedLinear) for layer in layers)
    assert not any(isinstance(m, PackedLinear) for m in plain.runner.text_model.modules())

    tokens = generate(packed, tiny_model, *size)
    images = [load_image(make_image(*size, seed=3))]
    assert tokens == generate(plain, tiny_model, *size)
    assert tokens == reference_tokens(tiny_model, images, QUESTION, max_new_tokens=20)


def test_head_only_packing_and_bad_mode(tiny_model):
    head = DecoderEngine(tiny_model, packed_linear="head")
    assert isinstance(head.runner.lm_head, PackedLinear)
    assert not any(isinstance(m, PackedLinear) for m in head.runner.text_model.modules())
    with pytest.raises(ValueError, match="packed_linear must be one of off, head, all"):
        DecoderEngine(tiny_model, packed_linear="fast")


def test_linear_patch_embed_equals_the_convolution(tiny_model):
    engine = VisionEngine(tiny_model)
    assert isinstance(engine.tower.patch_embed, LinearPatchEmbed)
    config = copy.deepcopy(Checkpoint(tiny_model).config.vision_config)
    conv_tower = Checkpoint(tiny_model).family.vision_class._from_config(config)
    conv_tower.patch_embed.proj.weight.data.copy_(engine.tower.patch_embed.weight.view_as(conv_tower.patch_embed.proj.weight))
    if conv_tower.patch_embed.proj.bias is not None:
        conv_tower.patch_embed.proj.bias.data.copy_(engine.tower.patch_embed.bias)
    pixels = torch.randn(37, engine.tower.patch_embed.weight.shape[1], generator=torch.Generator().manual_seed(0))

    torch.testing.assert_close(engine.tower.patch_embed(pixels), conv_tower.patch_embed(pixels), rtol=1e-5, atol=1e-5)
    # shares the checkpoint's storage: no second copy of the weight
    assert engine.tower.patch_embed.weight.untyped_storage().nbytes() == engine.tower.patch_embed.weight.nbytes
