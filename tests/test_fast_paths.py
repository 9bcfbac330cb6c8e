"""The CPU fast paths (oneDNN-packed decoder weights, the linear patch embedding) compute what the
plain modules compute, and greedy tokens through them equal the monolithic model's (fp32)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_image
from reference import reference_tokens
from services.llm_decoder.engine import DecoderEngine, GenerationInput
from shared.packed_linear import DENSE_FROM_ROWS, PackedLinear, can_pack, choose_one_row_kernel
from shared.sampling import SamplingParams
from services.vision_encoder.engine import VisionEngine
from services.vision_encoder.fast_ops import LinearPatchEmbed
from shared.checkpoint import Checkpoint
from shared.images import load_image
from shared.schema import question_messages

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


@pytest.mark.skipif(not can_pack(torch.bfloat16, torch.device("cpu")), reason="oneDNN packs no bf16 weights here")
@pytest.mark.parametrize("bias", [False, True])
def test_one_bf16_row_takes_the_matrix_vector_kernel(bias):
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(96, 64, generator=gen).bfloat16()
    b = torch.randn(96, generator=gen).bfloat16() if bias else None
    both, packed_only = PackedLinear(weight, b, dense=True), PackedLinear(weight, b)
    assert both.mv_one_row and not packed_only.mv_one_row  # mv needs the dense weight
    assert not PackedLinear(weight.float(), None, dense=True).mv_one_row  # float32 keeps the packed kernel
    x = torch.randn(1, 1, 64, generator=gen).bfloat16()
    expected = torch.nn.functional.linear(x.float(), weight.float(), None if b is None else b.float())
    got = both(x)
    assert got.shape == (1, 1, 96) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, packed_only(x), rtol=2e-2, atol=2e-2)
    rows = torch.randn(1, 3, 64, generator=gen).bfloat16()  # more rows: the packed kernel, as before
    assert torch.equal(both(rows), packed_only(rows))


def generate(decoder: DecoderEngine, path: str, width: int, height: int) -> list[int]:
    encoder = VisionEngine(path)
    images = [load_image(make_image(width, height, seed=3))]
    request = GenerationInput(question_messages(QUESTION, 1), encoder.encode(images),
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


def plain_tower(path: str, dtype: torch.dtype):
    """The family's transformers vision tower with the checkpoint's weights and the linear patch embedding
    (tested above), nothing else replaced."""
    from services.vision_encoder.fast_ops import use_linear_patch_embed
    from shared.checkpoint import load_strict

    checkpoint = Checkpoint(path)
    config = copy.deepcopy(checkpoint.config.vision_config)
    config._attn_implementation = "sdpa"
    tower = checkpoint.family.vision_class._from_config(config, dtype=torch.float32)
    load_strict(tower, checkpoint.read(checkpoint.visual_names(), dtype))
    use_linear_patch_embed(tower)
    return tower.eval()


@torch.inference_mode()
def tower_outputs(engine: VisionEngine, tower, width: int = 300, height: int = 220) -> tuple[torch.Tensor, ...]:
    """(pooled embeddings, *deepstack levels) of one image through `tower`, from the engine's preprocessing."""
    [inputs] = engine.preprocess([load_image(make_image(width, height, seed=8))])
    out = tower(inputs.pixel_values.to(engine.dtype), grid_thw=torch.tensor([inputs.grid_thw]))
    return (out.pooler_output, *(getattr(out, "deepstack_features", None) or []))


def test_fast_rotary_is_bit_identical_to_transformers_in_float32(tiny_model):
    engine = VisionEngine(tiny_model)
    assert engine.fused_activations == 0  # float32 keeps torch's own activations: the exact reference
    for ours, theirs in zip(tower_outputs(engine, engine.tower), tower_outputs(engine, plain_tower(tiny_model, torch.float32))):
        assert torch.equal(ours, theirs)


def test_bf16_tower_with_fused_activations_stays_within_bf16_tolerance(tiny_model):
    """bf16: each block's MLP activation runs as its first GEMM's oneDNN post-op (QuickGELU, SiLU gate or
    tanh-GELU by family), next to the fast rotary; the output matches the plain bf16 tower within bf16 noise."""
    if not can_pack(torch.bfloat16, torch.device("cpu")):
        pytest.skip("this CPU's oneDNN has no bf16 kernels: the tower runs unfused (the fused path is not taken)")
    engine = VisionEngine(tiny_model, dtype=torch.bfloat16)
    assert engine.fused_activations == len(engine.tower.blocks)
    for block in engine.tower.blocks:
        assert any(isinstance(m, PackedLinear) and m.activation[0] != "none" for m in block.mlp.modules())
    ours = tower_outputs(engine, engine.tower)
    theirs = tower_outputs(engine, plain_tower(tiny_model, torch.bfloat16))
    exact = tower_outputs(engine, plain_tower(tiny_model, torch.float32).float())  # what both approximate
    for a, b, ref in zip(ours, theirs, exact):
        a, b, ref = a.float(), b.float(), ref.float()
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) >= 0.9999
        # no further from float32 than bf16 itself is, give or take a rounding
        assert (a - ref).norm() <= 1.5 * (b - ref).norm() + 1e-6


@pytest.mark.skipif(not can_pack(torch.bfloat16, torch.device("cpu")), reason="oneDNN packs no bf16 weights here")
def test_the_one_row_kernel_is_chosen_for_all_bf16_linears_and_both_agree():
    gen = torch.Generator().manual_seed(4)
    linears = [PackedLinear(torch.randn(128, 64, generator=gen).bfloat16(), None, dense=True) for _ in range(3)]
    fp32 = PackedLinear(torch.randn(8, 64, generator=gen), None, dense=True)
    choice = choose_one_row_kernel([*linears, fp32])
    assert choice in ("mv", "packed")
    assert {m.mv_one_row for m in linears} == {choice == "mv"} and not fp32.mv_one_row
    x = torch.randn(1, 64, generator=gen).bfloat16()
    for m in linears:
        chosen = m(x)
        m.mv_one_row = not m.mv_one_row
        torch.testing.assert_close(chosen, m(x), rtol=2e-2, atol=2e-2)
    assert choose_one_row_kernel([fp32]) == ""
