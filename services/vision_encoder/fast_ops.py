"""Drop-in replacements for the parts of transformers' vision towers that are not matmuls.

Profiled on CPU (2 cores, fp32, one 1024x1024 image = 5,476 patches, bench widths), the towers
spend 85-90 % of their time in the projections' GEMMs and in SDPA. Of the rest, the patch embedding
is the one piece done in a needlessly slow way: a Conv3d whose kernel equals its stride, i.e. a
matrix product over each flattened patch, which oneDNN's convolution path runs 2-3x slower than the
same product as a linear (0.27-0.41 s -> ~0.12 s per 1024x1024 image). `use_linear_patch_embed`
swaps it for that linear, sharing the convolution's weight storage (no copy).

In bf16 on an AMX Xeon (bench Qwen2-VL tower, one 1024x1024 image, 3.7 s) the elementwise work is a
fifth of the time: QuickGELU's mul + sigmoid + mul on [5476, 5120] (~105 ms a layer) and the float32
rotary embedding (casts, `rotate_half`'s neg + cat, muls and adds on q and k). Two replacements:
- `fuse_mlp_activations`: the MLP's activation runs as the post-op of its first GEMM (oneDNN's
  `_linear_pointwise`, shared/packed_linear.py): SiLU (Qwen2.5-VL's gate), tanh-GELU (Qwen3-VL) and
  QuickGELU (Qwen2-VL) as SiLU of the pre-activation scaled by 1.702, the scale folded into the first
  GEMM's weights and its inverse into the second's (x * sigmoid(1.702 x) = silu(1.702 x) / 1.702).
  bf16 only: it rounds differently from torch's ops, so the float32 tower (the exact reference) keeps them.
- `use_fast_rotary`: the rotary embedding on q and k together, without `rotate_half`'s negation and
  concatenation: the same IEEE operations in the same order (q1 c1 - q2 s1, q2 c2 + q1 s2), so the
  result is bit for bit the reference's, in every dtype.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from shared.packed_linear import PackedLinear, can_pack

QUICK_GELU_ALPHA = 1.702
# activation class -> (oneDNN post-op, algorithm, scale of the pre-activation)
POST_OPS = {"SiLUActivation": ("swish", "", 1.0), "SiLU": ("swish", "", 1.0), "GELUTanh": ("gelu", "tanh", 1.0),
            "PytorchGELUTanh": ("gelu", "tanh", 1.0), "QuickGELUActivation": ("swish", "", QUICK_GELU_ALPHA)}
# (first linear, activation, second linear) of each family's vision MLP
MLP_PARTS = (("fc1", "act", "fc2"), ("gate_proj", "act_fn", "down_proj"), ("linear_fc1", "act_fn", "linear_fc2"))


class LinearPatchEmbed(nn.Module):
    """A Qwen-VL PatchEmbed (Conv3d with kernel == stride) as one linear over flattened patches."""

    def __init__(self, conv: nn.Conv3d, embed_dim: int):
        super().__init__()
        if tuple(conv.kernel_size) != tuple(conv.stride) or any(conv.padding) or conv.groups != 1:
            raise ValueError(f"not a patchify convolution: {conv}")
        self.embed_dim = embed_dim
        self.weight = conv.weight.view(conv.out_channels, -1)  # same storage as the conv's weight
        self.bias = conv.bias

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, self.weight.shape[1]).to(self.weight.dtype)
        return nn.functional.linear(x, self.weight, self.bias).view(-1, self.embed_dim)


def use_linear_patch_embed(tower: nn.Module) -> None:
    """Replace `tower.patch_embed` (any of the three families) by its LinearPatchEmbed."""
    embed = tower.patch_embed
    tower.patch_embed = LinearPatchEmbed(embed.proj, embed.embed_dim)


def fuse_mlp_activations(tower: nn.Module, dtype: torch.dtype) -> int:
    """Each block's MLP activation as its first GEMM's oneDNN post-op (bf16 on CPU); returns blocks fused."""
    if dtype != torch.bfloat16 or not can_pack(dtype, next(tower.parameters()).device):
        return 0
    fused = 0
    for block in tower.blocks:
        mlp = block.mlp
        parts = next((p for p in MLP_PARTS if all(hasattr(mlp, name) for name in p)), None)
        post_op = parts and POST_OPS.get(type(getattr(mlp, parts[1])).__name__)
        if not post_op or not isinstance(getattr(mlp, parts[0]), nn.Linear):
            continue
        first, act, second = parts
        name, algorithm, scale = post_op
        linear = getattr(mlp, first)
        bias = None if linear.bias is None else linear.bias * scale
        setattr(mlp, first, PackedLinear(linear.weight * scale, bias, activation=(name, algorithm)))
        setattr(mlp, act, nn.Identity())
        if scale != 1.0:  # only in a non-gated MLP (Qwen2-VL's QuickGELU): the second GEMM takes the 1 / scale
            getattr(mlp, second).weight.data.div_(scale)
        fused += 1
    return fused


def use_fast_rotary(tower: nn.Module) -> None:
    """Every block's attention computes its rotary embedding with `_rotary` (bit-identical, fewer passes)."""
    for block in tower.blocks:
        block.attn.forward = types.MethodType(_attention_forward, block.attn)


def _rotary(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """qk [S, 2, H, D] (q and k), cos/sin [S, D] -> rotated, in float32 as transformers computes it."""
    x = qk.float()
    c, s = cos[:, None, None, :].float(), sin[:, None, None, :].float()
    half = x.shape[-1] // 2
    out = x * c
    out[..., :half] -= x[..., half:] * s[..., :half]  # rotate_half(x) = cat(-x2, x1)
    out[..., half:] += x[..., :half] * s[..., half:]
    return out.to(qk.dtype)


def _attention_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                       position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
    """transformers' Qwen2/2.5/3-VL vision attention (non-flash path: SDPA per image) with `_rotary`."""
    seq_length = hidden_states.shape[0]
    qkv = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1)  # [S, 3, H, D]
    q, k = _rotary(qkv[:, :2], *position_embeddings).unbind(1)
    states = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, qkv[:, 2])]  # each [1, H, S, D]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    outputs = [sdpa_attention_forward(self, qi, ki, vi, attention_mask=None, scaling=self.scaling, dropout=0.0,
                                      is_causal=False)[0]
               for qi, ki, vi in zip(*(torch.split(t, lengths, dim=2) for t in states))]
    return self.proj(torch.cat(outputs, dim=1).reshape(seq_length, -1).contiguous())
