"""The KV pool: every layer's keys and values for every block, allocated once from a byte budget.

Layout [layers, 2 (K, V), kv_heads, slots, head_dim] with slot = block * block_size + offset, so a
sequence's context for one layer is one `index_select` over slots, already shaped [kv_heads, T,
head_dim] for attention, and a block copy (copy on write) is one slice assignment for all layers.
"""

from __future__ import annotations

import torch


class KVPool:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.slots = num_blocks * block_size
        # torch.empty: pages are committed as blocks are first written, not up front.
        self.kv = torch.empty(layers, 2, kv_heads, self.slots, head_dim, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return layers * 2 * kv_heads * head_dim * dtype.itemsize

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values: [kv_heads, n, head_dim] for the n slots."""
        self.kv[layer, 0].index_copy_(1, slots, keys)
        self.kv[layer, 1].index_copy_(1, slots, values)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [kv_heads, len(slots), head_dim] of `slots` in this layer."""
        return self.kv[layer, 0].index_select(1, slots), self.kv[layer, 1].index_select(1, slots)

    def copy_block(self, src: int, dst: int) -> None:
        bs = self.block_size
        self.kv[:, :, :, dst * bs:(dst + 1) * bs] = self.kv[:, :, :, src * bs:(src + 1) * bs]
