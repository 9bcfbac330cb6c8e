"""int8 weights (`--quantize int8`): the kernels against the dequantized reference, and whole models
against the same model unquantized, all families."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import FAMILIES, family_params
from engines import image_payload, request, tokens
from services.llm_decoder.engine import DecoderEngine
from services.vision_encoder.engine import VisionEngine
from shared import quantize
from shared.quantize import Int8Linear, quantize_linears, quantize_rows, resident_bytes

# Stated tolerance of a quantized model's last-layer logits against the same model unquantized (tiny
# random-weight models, float32): cosine over the vocabulary. bench/quantize.py prints the same figure,
# and greedy agreement, for the bench checkpoints.
LOGITS_COSINE = 0.99  # measured 0.994-0.9987 on the tiny models (their logits are nearly flat)
EMBEDDINGS_COSINE = 0.999
SAMPLE = Path(__file__).resolve().parent.parent / "docs" / "sample.png"


def dequantized(linear: Int8Linear) -> torch.Tensor:
    return linear.qweight.float() * linear.scale.float()[:, None]


def test_rows_round_to_the_nearest_step_of_their_own_scale():
    w = torch.randn(48, 96) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different magnitudes
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert torch.all((w - q.float() * scale[:, None]).abs() <= scale[:, None] / 2 + 1e-7)
    assert torch.allclose(q.abs().amax(dim=1).float(), torch.full((48,), 127.0))  # each row uses the full range


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features", [64, 40])  # 64: the int8 kernel; 40: the dequantized fallback
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 300])  # decode sizes, the switch-over, prefill sizes
def test_int8_linear_equals_the_dequantized_weight(dtype, in_features, rows):
    torch.manual_seed(rows)
    linear = nn.Linear(in_features, 72, bias=True).to(dtype)
    int8 = Int8Linear(linear.weight, linear.bias)
    x = torch.randn(2, rows, in_features, dtype=dtype)
    reference = nn.functional.linear(x.float(), dequantized(int8).to(dtype).float(), linear.bias.float())
    out = int8(x)
    assert out.shape == (2, rows, 72) and out.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(out.float(), reference, rtol=tol, atol=tol * reference.abs().max().item())


def test_a_large_weight_is_dequantized_slice_by_slice_with_the_same_result(monkeypatch):
    linear = nn.Linear(64, 1000, bias=True)
    int8 = Int8Linear(linear.weight, linear.bias)
    x = torch.randn(40, 64)
    whole = int8(x)
    monkeypatch.setattr(quantize, "SCRATCH_ELEMENTS", 64 * 300)  # 4 slices, the last one short
    assert torch.allclose(int8(x), whole, atol=1e-5)


def test_quantize_linears_replaces_every_linear_and_shrinks_the_weights():
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Sequential(nn.Linear(128, 64)))
    before = resident_bytes(model)
    assert quantize_linears(model) == 2
    assert not [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert resident_bytes(model) < before / 3  # int8 + a scale per row vs float32


@lru_cache(maxsize=None)
def decoders(path: str) -> tuple[DecoderEngine, DecoderEngine]:
    return DecoderEngine(path), DecoderEngine(path, quantize="int8")


@lru_cache(maxsize=None)
def decoders_off(path: str) -> DecoderEngine:
    """Unquantized and unpacked: one float copy of every weight, the int8 layers' baseline."""
    return DecoderEngine(path, packed_linear="off", kv_cache_bytes=1 << 20)


def first_logits(decoder: DecoderEngine, req) -> tuple[torch.Tensor, list[int]]:
    """The logits of the first answer token (captured at the LM head) and the greedy answer."""
    seen: list[torch.Tensor] = []
    hook = decoder.runner.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.float().clone()))
    try:
        answer = tokens(decoder.generate(req))
    finally:
        hook.remove()
    return seen[0][-1], answer


@pytest.mark.parametrize("family", FAMILIES)
def test_an_int8_decoder_holds_fewer_bytes_and_its_logits_stay_close(tiny_models, family):
    path = tiny_models[family]
    full, int8 = decoders(path)
    assert int8.runner.quantize == "int8" and int8.runner.packed == "head"  # the head stays as loaded, packed
    layers = [m for m in int8.runner.text_model.layers.modules() if isinstance(m, nn.Linear)]
    assert not layers and isinstance(int8.runner.text_model.layers[0].mlp.down_proj, Int8Linear)
    assert int8.runner.weight_bytes() < full.runner.weight_bytes()
    assert (resident_bytes(int8.runner.text_model.layers) < resident_bytes(decoders_off(path).runner.text_model.layers) / 3)
    payload, img_id, _ = image_payload(path, seed=7)
    req = request(payload, img_id, "What is in the picture?", max_new_tokens=8)
    (a, answer_full), (b, answer_int8) = first_logits(full, req), first_logits(int8, req)
    cosine = nn.functional.cosine_similarity(a, b, dim=0).item()
    print(f"{family}: int8 logits cosine {cosine:.6f}, weights {int8.runner.weight_bytes()} vs "
          f"{full.runner.weight_bytes()} bytes, answers {answer_int8} / {answer_full}")
    assert cosine >= LOGITS_COSINE
    assert len(answer_int8) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_an_int8_tower_holds_fewer_bytes_and_its_embeddings_stay_close(tiny_models, family):
    from shared.images import load_image

    from conftest import make_image

    path = tiny_models[family]
    full, int8 = VisionEngine(path), VisionEngine(path, quantize="int8")
    assert int8.weight_bytes() < full.weight_bytes()
    image = load_image(make_image(200, 160, seed=3))
    a, b = full.encode([image])[0], int8.encode([image])[0]
    for x, y in zip((a.embeddings, *a.deepstack), (b.embeddings, *b.deepstack)):
        assert nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0).item() >= EMBEDDINGS_COSINE


def serving_addresses(log: str) -> dict[str, str]:
    """`vlsplit up`'s "NAME: serving on HOST:PORT" lines."""
    found = re.findall(r"^(encoder|decoder|gateway): serving on (\S+)", log, flags=re.MULTILINE)
    return dict(found)


def model_info(address: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "vlsplit.cli", "health", "--verbose", address],
                         check=True, capture_output=True, text=True).stdout
    return dict(line.split(": ", 1) for line in out.splitlines()[1:])


# int8 engines of every family: the two tests above; the CLI path is one (Qwen3-VL: deepstack mergers too)
@pytest.mark.parametrize("family", family_params("qwen3_vl"))
def test_vlsplit_up_with_int8_answers_from_smaller_weights(tiny_models, family, tmp_path):
    """`vlsplit up --dtype auto --quantize int8`, as a user runs it: both model services report int8 and
    fewer resident weight bytes than the same engines unquantized, and questions get answers."""
    from procs import free_port
    from shared.codec import DTYPES
    from shared.hardware import resolve_dtype

    path, port = tiny_models[family], free_port()
    log = tmp_path / "up.log"
    up = subprocess.Popen([sys.executable, "-m", "vlsplit.cli", "up", "--model", path, "--gateway-port", str(port),
                           "--http-port", "-1", "--redis", "memory", "--dtype", "auto", "--quantize", "int8"],
                          stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    try:
        line = up.stdout.readline()  # blocks until everything is serving
        assert f"gateway on 127.0.0.1:{port}" in line, log.read_text()
        addresses = serving_addresses(log.read_text())
        encoder, decoder = model_info(addresses["encoder"]), model_info(addresses["decoder"])
        dtype = resolve_dtype("auto", "cpu").name
        for info in (encoder, decoder):
            assert (info["quantize"], info["dtype"]) == ("int8", dtype)
        torch_dtype = DTYPES[dtype]
        assert int(encoder["weight_bytes"]) < VisionEngine(path, dtype=torch_dtype).weight_bytes()
        unquantized = DecoderEngine(path, dtype=torch_dtype, kv_cache_bytes=1 << 20)
        assert int(decoder["weight_bytes"]) < unquantized.runner.weight_bytes()
        unquantized.close()
        out = subprocess.run([sys.executable, "-m", "vlsplit.cli", "ask", str(SAMPLE), "What is this?", "Why?",
                              "--json", "--gateway", f"127.0.0.1:{port}", "--max-new-tokens", "6"],
                             check=True, capture_output=True, text=True)
        answers = [json.loads(line) for line in out.stdout.splitlines()]
        assert [a["cache"] for a in answers] == ["miss", "hit"]
        assert all(a["token_ids"] or a["finish_reason"] == "stop" for a in answers)
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=90) == 0
