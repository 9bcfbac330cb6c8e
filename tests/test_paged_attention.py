"""Paged decode attention (services/llm_decoder/paged_kernel.py): the kernel over the pool in place vs
the gathered SDPA path, the engine with it vs the monolithic model (fp32, greedy ids), and the
fallback when the kernel cannot compile."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from engines import batch_tokens, engines, image_payload, request, tokens
from reference import reference_tokens
from services.llm_decoder.engine import DecoderEngine
from services.llm_decoder.kv_pool import KVPool
from services.llm_decoder.paged_kernel import PagedPlanner, check_decode_attention, paged_decode

ROOT = Path(__file__).resolve().parent.parent


def _gathered(q, pool, layer, tables, lengths, scale):
    """The reference: each row's context gathered and run through SDPA, as the "gather" path does."""
    out = []
    for r, (table, n) in enumerate(zip(tables, lengths)):
        slots = (torch.tensor(table)[:, None] * pool.block_size + torch.arange(pool.block_size)).flatten()[:n]
        k, v = pool.gather(layer, slots)
        out.append(torch.nn.functional.scaled_dot_product_attention(
            q[:, r:r + 1][None], k[None], v[None], scale=scale, enable_gqa=True)[0, :, 0])
    return torch.stack(out)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_kernel_matches_gathered_sdpa(dtype, tolerance):
    torch.manual_seed(0)
    heads, kv_heads, dim, bs = 8, 2, 64, 16
    pool = KVPool(layers=2, kv_heads=kv_heads, head_dim=dim, num_blocks=64, block_size=bs, dtype=dtype,
                  device=torch.device("cpu"))
    pool.kv.copy_(torch.randn_like(pool.kv, dtype=torch.float32))
    # rows of 1 token, a block boundary, a full last block, a long context; two rows share their first blocks
    lengths = [1, 17, 32, 200, 45]
    perm = torch.randperm(64).tolist()
    tables, at = [], 0
    for n in lengths:
        nb = -(-n // bs)
        tables.append(perm[at:at + nb])
        at += nb
    tables[4][:2] = tables[3][:2]
    q = torch.randn(heads, len(lengths), dim, dtype=dtype)
    plan = PagedPlanner(pool, torch.device("cpu")).plan(list(range(len(lengths))), tables, lengths)
    with torch.inference_mode():
        got = paged_decode(q, pool, 1, plan, dim ** -0.5)
    want = _gathered(q, pool, 1, tables, lengths, dim ** -0.5)
    assert got.shape == (len(lengths), heads, dim)
    torch.testing.assert_close(got.float(), want.float(), atol=tolerance, rtol=tolerance)


def test_planner_reuses_its_block_lists_across_steps():
    pool = KVPool(layers=1, kv_heads=1, head_dim=16, num_blocks=8, block_size=4, dtype=torch.float32,
                  device=torch.device("cpu"))
    planner = PagedPlanner(pool, torch.device("cpu"))
    planner.plan([0, 1, 2], [[1, 2], [3], [4, 5, 6]], [5, 2, 9])
    buffer = planner.full.data_ptr()
    planner.plan([0], [[7]], [3])
    assert planner.full.data_ptr() == buffer  # no allocation per step once wide enough


def test_mode_is_validated():
    with pytest.raises(ValueError, match="decode_attention must be one of auto, paged, gather"):
        check_decode_attention("flash")


@lru_cache(maxsize=None)
def paged_engine(path: str) -> DecoderEngine:
    return DecoderEngine(path, decode_attention="paged")


def test_engine_decodes_token_exact_on_the_paged_kernel(tiny_model):
    engine = paged_engine(tiny_model)
    assert engine.runner.paged_decode and engine.runner.decode_attention.startswith("paged")
    payload, img_id, img = image_payload(tiny_model, seed=5)
    got = tokens(engine.generate(request(payload, img_id, "What is in this picture?", max_new_tokens=16)))
    assert got == reference_tokens(tiny_model, [img], "What is in this picture?", max_new_tokens=16)


def test_rows_of_different_images_decode_together_as_when_gathered(tiny_model):
    """Several images at once: their decode rows share no prefix, so every step runs them all in one
    paged call; the answers equal the gathering engine's."""
    engine, gathering = paged_engine(tiny_model), engines(tiny_model)[1]
    assert not gathering.runner.paged_decode
    reqs = [request(*image_payload(tiny_model, seed=s)[:2], q, max_new_tokens=10)
            for s, q in [(11, "Describe it."), (12, "What colour?"), (13, "Count the shapes."), (11, "Why?")]]
    steps_before = len(engine.stats.records)
    got = batch_tokens(engine, reqs)
    assert got == batch_tokens(gathering, reqs)
    records = list(engine.stats.records)[steps_before:]
    assert max(len(r.decode) for r in records) >= 3  # rows were decoded together


def test_auto_falls_back_to_gathering_without_a_compiler(tmp_path):
    """No working C++ compiler (and no cached kernel): auto gathers and says why; paged refuses to start."""
    script = (
        "import torch\n"
        "from services.llm_decoder.kv_pool import KVPool\n"
        "from services.llm_decoder.paged_kernel import resolve\n"
        "pool = KVPool(1, 1, 16, 4, 4, torch.float32, torch.device('cpu'))\n"
        "enabled, reason = resolve('auto', pool, 2, 16, torch.device('cpu'))\n"
        "print(enabled, reason)\n"
        "try:\n"
        "    resolve('paged', pool, 2, 16, torch.device('cpu'))\n"
        "except RuntimeError as e:\n"
        "    print('REFUSED', e)\n"
    )
    env = {**os.environ, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("False gather (paged kernel unavailable:") and "C++ compiler" in lines[0], out.stdout
    assert lines[1].startswith("REFUSED decode_attention=paged: the paged kernel does not compile here"), out.stdout
