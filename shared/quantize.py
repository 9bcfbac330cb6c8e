"""int8 weights, quantized at load from a bf16/fp32 checkpoint (`--quantize int8`).

Per output channel, symmetric: row r of a [out, in] weight is stored as int8 q[r] with one scale
s[r] = max|W[r]| / 127, W ~= q * s. Activations stay in the serving dtype (weight-only, "W8A16"):
no calibration, no pre-quantized checkpoint, and the error is the weights' rounding alone.

What is quantized: the decoder layers' linears and the vision tower's. The token embedding and the LM
head stay in the serving dtype, as in most weight-only schemes: on the bench checkpoint the tied
embedding's int8 rounding was the largest single error (logits cosine 0.957-0.990 against 0.975-0.985
for all layers and 0.99997 for the head alone), and a step of many rows would dequantize the whole
151,936-row head (~100 ms) where the packed bf16 head takes 24 ms at 64 rows.

Which kernel, by rows per call (measured on a 2-core Xeon with AMX, bf16, bench widths):
- few rows (decode): `torch._weight_int8pack_mm` reads the int8 weight directly, so it moves half
  the bytes of a bf16 GEMV: [1 x 1536] x [1536 x 8960] 0.53 ms vs 1.30 ms bf16. Its cost grows
  with the rows (1.9 ms at 8, 15 ms at 64), so it is used up to INT8PACK_MAX_ROWS.
- more rows (prefill, the vision tower): the weight is dequantized into a reused scratch buffer
  (2.9 ms for 1536 x 8960) and multiplied by the dense kernel; the GEMM dominates (77 ms for a
  2,048-row chunk). Large weights are dequantized slice by slice, so the scratch stays bounded
  (SCRATCH_ELEMENTS).
Measured and not used: W8A8 through oneDNN's AMX-int8 `onednn.qlinear_pointwise` is faster per
GEMM (51-84 ms vs 111-132 ms at 5,476 x 1280 x 5120) but quantizing activations in eager torch
costs more than it saves (13-175 ms a call) and its error is 5x bf16's (README "Performance").
`_weight_int8pack_mm` is only used where `in_features % 32 == 0`: for other widths its bf16 path
returned wrong values in our tests (tiny test models); those fall back to the dequantized kernel.
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("off", "int8")
INT8PACK_MAX_ROWS = 16
INT8PACK_ALIGN = 32
SCRATCH_ELEMENTS = 16 << 20  # dequantized weight elements held at once (32 MiB in bf16)
_scratch: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def check_quantize(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"quantize {mode!r} is not one of {', '.join(MODES)}")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (int8 [out, in], float32 scales [out]), W ~= q * s[:, None]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """y = x (q s)^T + b, computed in x's dtype; see the module docstring for the kernels."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        qweight, scale = quantize_rows(weight)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.to(weight.dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.int8pack = self.in_features % INT8PACK_ALIGN == 0 and weight.device.type == "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.int8pack and flat.shape[0] <= INT8PACK_MAX_ROWS:
            y = torch._weight_int8pack_mm(flat.contiguous(), self.qweight, self.scale.to(x.dtype))
            if self.bias is not None:
                y = y + self.bias
        else:
            y = self._dequantized(flat)
        return y.view(*x.shape[:-1], self.out_features)

    def _dequantized(self, x: torch.Tensor) -> torch.Tensor:
        step = max(1, min(self.out_features, SCRATCH_ELEMENTS // self.in_features))
        if step == self.out_features:
            return nn.functional.linear(x, self.dequantize(0, step, x.dtype), self.bias)
        out = x.new_empty(x.shape[0], self.out_features)
        for lo in range(0, self.out_features, step):
            hi = min(lo + step, self.out_features)
            bias = None if self.bias is None else self.bias[lo:hi]
            out[:, lo:hi] = nn.functional.linear(x, self.dequantize(lo, hi, x.dtype), bias)
        return out

    def dequantize(self, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [lo, hi) of the weight in `dtype`, in the shared scratch buffer (valid until the next call)."""
        need = (hi - lo) * self.in_features
        key = (dtype, self.qweight.device)
        if key not in _scratch or _scratch[key].numel() < need:
            _scratch[key] = torch.empty(need, dtype=dtype, device=self.qweight.device)
        w = _scratch[key][:need].view(hi - lo, self.in_features)
        return w.copy_(self.qweight[lo:hi]).mul_(self.scale[lo:hi, None].to(dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def quantize_linears(module: nn.Module) -> int:
    """Replace every nn.Linear under `module` by an Int8Linear; returns how many were replaced."""
    targets = [(name, child) for name, child in module.named_modules() if isinstance(child, nn.Linear)]
    for name, linear in targets:
        parent, _, attr = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        setattr(owner, attr, Int8Linear(linear.weight, linear.bias))
    return len(targets)


def resident_bytes(*modules: nn.Module) -> int:
    """Bytes of the distinct tensors (parameters and buffers) the modules hold."""
    seen: dict[int, int] = {}
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            if t.device.type == "meta":
                continue
            try:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            except NotImplementedError:  # oneDNN's packed (opaque) weights have no storage to ask
                seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())
