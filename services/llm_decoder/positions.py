"""M-RoPE position ids for a prompt with images, from the images' grids alone.

Text tokens advance all three axes (temporal, height, width) together; an image's tokens take
(t, row, col) positions on its merged grid, offset by the position where the image starts, and the
text after it resumes at that offset + max(h, w) / merge. Identical for Qwen2-VL, 2.5-VL and 3-VL
images (their `get_rope_index` differ only for video).
"""

from __future__ import annotations

import itertools

import torch


def mrope_positions(
    mm_token_type_ids: torch.Tensor, grids: list[tuple[int, int, int]], merge_size: int
) -> tuple[torch.Tensor, int]:
    """Positions [3, L] for one prompt and its rope delta (max position + 1 - L).

    Decoding then places token number n (0-based over the whole sequence) at n + delta on all axes.
    """
    chunks = []
    grid_iter = iter(grids)
    start = 0
    for modality, group in itertools.groupby(mm_token_type_ids.tolist()):
        length = len(list(group))
        if modality == 0:
            chunks.append(torch.arange(start, start + length).expand(3, -1))
            start += length
        else:
            t, h, w = next(grid_iter)
            chunks.append(_image_positions(start, t, h // merge_size, w // merge_size))
            start += max(h, w) // merge_size
    positions = torch.cat(chunks, dim=1)
    return positions, int(positions.max()) + 1 - positions.shape[1]


def _image_positions(start: int, t: int, h: int, w: int) -> torch.Tensor:
    """[3, t*h*w] positions of an image's merged tokens, in the tower's row-major order."""
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start
