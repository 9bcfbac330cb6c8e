"""Linear layers with weights pre-packed for oneDNN: the decoder's small-M matmuls on CPU, and the
vision towers' MLP GEMMs with their activation fused in (services/vision_encoder/fast_ops.py).

A decode step multiplies a handful of rows by every weight matrix. torch's default CPU path (MKL
sgemm on a plain [out, in] weight) is poorly blocked for that shape: on a 2-core AVX2 machine the
151,936 x 1,536 head takes 50 ms for one row and 208 ms for eight, against 39 and 58 ms with the
weight reordered once into oneDNN's blocked layout (`torch.ops.mkldnn._reorder_linear_weight`) and
multiplied with `torch.ops.mkldnn._linear_pointwise`, the kernel pair torch.compile's CPU backend
emits for frozen linears. For many rows (a prefill chunk) it is the other way round in float32: the
dense kernel is 10-25 % faster from a few hundred rows on. So a layer keeps both copies and picks per
call by row count (`DENSE_FROM_ROWS`; in bf16 on AMX the packed kernel is as fast or faster at every
row count, and bit-identical, so bf16 calls of two rows or more always take it); that costs one more
copy of its weights in memory, which
`packed_linear = "head"` avoids (only the LM head, which multiplies one row per sequence, is packed;
a tied head keeps its dense rows anyway for the embedding lookup, and shares them here). In bf16, a
call of exactly one row may go to `torch.mv` on the dense weight where one is kept: which kernel reads
streaming weights faster depends on the CPU (on a Xeon with AMX torch.mv, 66.6-72.4 vs 70.6-78.8 ms a
one-row step; on an AMD EPYC with AVX-512 BF16 the packed GEMV, 43.8-44.5 vs 73.3-77.2 ms), so
`choose_one_row_kernel` times both over the model's own linears at load and keeps the faster.

Results differ from the dense kernel only in summation order (max |diff| ~5e-6 in fp32), as any
change of batch shape already does; the equivalence suite checks greedy tokens stay identical.
`pack_linears` leaves a model untouched where oneDNN cannot pack the weights (not on CPU, no
oneDNN, or a dtype the CPU lacks instructions for, e.g. bf16 without AVX-512).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("vlsplit.decoder")


MODES = ("off", "head", "all")
DENSE_FROM_ROWS = 256  # calls with at least this many rows use the dense weight, where one is kept


class PackedLinear(nn.Module):
    """y = act(x W^T + b) with W held in oneDNN's blocked layout (and, with `dense`, also as given).
    `activation` is a oneDNN post-op fused into the GEMM: ("swish", "") = SiLU, ("gelu", "tanh"), or none."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dense: bool = False,
                 activation: tuple[str, str] = ("none", "")):
        super().__init__()
        if dense and activation[0] != "none":
            raise ValueError("a fused activation has no dense fallback")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.activation = activation
        # buffers, so the weights resident are counted (shared/quantize.py::resident_bytes)
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
        self.register_buffer("dense", weight.detach() if dense else None)
        self.bias = None if bias is None else bias.detach()
        # One-row calls (a decode step of one sequence) of a bf16 weight kept dense go to torch.mv: it streams
        # the weight from memory faster than oneDNN's packed GEMV on AMX (bench/decode_steps.py, variant "nomv").
        self.mv_one_row = self.dense is not None and weight.dtype == torch.bfloat16
        # Many-row calls (prefill chunks) on the dense weight: faster in float32 (MKL), but not in bf16 on AMX, where
        # the packed kernel is as fast or faster (the 8,960 x 1,536 MLP projections at 1,405 rows: 25 vs 34-42 ms)
        self.dense_for_many_rows = self.dense is not None and weight.dtype != torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense_for_many_rows and x.numel() >= DENSE_FROM_ROWS * self.in_features:
            return nn.functional.linear(x, self.dense, self.bias)
        if self.mv_one_row and x.numel() == self.in_features:  # one row, bf16: the matrix-vector kernel
            flat = x.reshape(-1)
            out = torch.mv(self.dense, flat) if self.bias is None else torch.addmv(self.bias, self.dense, flat)
            return out.view(*x.shape[:-1], self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, self.activation[0], [], self.activation[1])

    def extra_repr(self) -> str:
        act = "" if self.activation[0] == "none" else f", activation={'-'.join(filter(None, self.activation))}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{act}"


def choose_one_row_kernel(linears: list[PackedLinear], rounds: int = 3) -> str:
    """"mv" or "packed": whichever runs one row through every linear of `linears` (a decode step's weights,
    streaming from memory as in a real step) faster, timed here; set on all of them. "" when none could
    take torch.mv (not bf16, or no dense weight)."""
    import time

    candidates = [m for m in linears if m.dense is not None and m.dense.dtype == torch.bfloat16]
    if not candidates:
        return ""
    rows = [torch.zeros(1, m.in_features, dtype=torch.bfloat16, device=m.dense.device) for m in candidates]

    def step(use_mv: bool) -> float:
        for m in candidates:
            m.mv_one_row = use_mv
        start = time.perf_counter()
        with torch.inference_mode():
            for m, x in zip(candidates, rows):
                m(x)
        return time.perf_counter() - start

    step(True), step(False)  # first-call costs
    best = {True: float("inf"), False: float("inf")}
    for _ in range(rounds):
        for use_mv in (True, False):
            best[use_mv] = min(best[use_mv], step(use_mv))
    use_mv = best[True] <= best[False]
    for m in candidates:
        m.mv_one_row = use_mv
    log.info("one-row bf16 calls take %s: %.1f ms (torch.mv) vs %.1f ms (oneDNN packed GEMV) over %d linears",
             "torch.mv" if use_mv else "the packed GEMV", best[True] * 1000, best[False] * 1000, len(candidates))
    return "mv" if use_mv else "packed"


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether oneDNN packs `dtype` weights on this machine (tried on a tiny matrix)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.zeros(8, 8, dtype=dtype)
        PackedLinear(w, None)(torch.zeros(1, 8, dtype=dtype))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True


def pack_linears(module: nn.Module, dense: bool) -> int:
    """Replace every nn.Linear under `module` by a PackedLinear (keeping the dense weight too, for
    many-row calls, when `dense`). Returns how many were replaced."""
    targets = [(name, child) for name, child in module.named_modules() if isinstance(child, nn.Linear)]
    for name, linear in targets:
        parent, _, attr = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        setattr(owner, attr, PackedLinear(linear.weight, linear.bias, dense=dense))
    return len(targets)
