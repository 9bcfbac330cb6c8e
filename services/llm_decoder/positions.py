"""M-RoPE position ids for a prompt with images and clips, from their grids (and clip timing) alone.

Text tokens advance all three axes (temporal, height, width) together; an image's or clip's tokens take
(t, row, col) positions on its merged grid, offset by the position where the run starts, and the text
after it resumes at that offset + max(h, w) / merge (transformers' `get_rope_index` for all three
families). The temporal axis of a run of t > 1 patches is `floor(i * interval)` for patch i: interval 1,
except Qwen2.5-VL clips, where it is `tokens_per_second * second_per_grid_t`. Qwen3-VL places every
temporal patch of a clip as a run of its own ((1, h, w), after its timestamp text), which the caller
expresses by passing one run per patch (`PromptBuilder.media_runs`).
"""

from __future__ import annotations

import itertools

import torch


def mrope_positions(
    mm_token_type_ids: torch.Tensor, runs: list[tuple[int, int, int]], merge_size: int,
    intervals: list[float] | None = None,
) -> tuple[torch.Tensor, int]:
    """Positions [3, L] for one prompt and its rope delta (max position + 1 - L). `runs`: the grid of each
    run of image/video tokens in order; `intervals`: each run's temporal spacing (default 1).

    Decoding then places token number n (0-based over the whole sequence) at n + delta on all axes.
    """
    chunks = []
    run_iter = iter(zip(runs, intervals if intervals is not None else [1.0] * len(runs)))
    start = 0
    for modality, group in itertools.groupby(mm_token_type_ids.tolist()):
        length = len(list(group))
        if modality == 0:
            chunks.append(torch.arange(start, start + length).expand(3, -1))
            start += length
        else:
            (t, h, w), interval = next(run_iter)
            chunks.append(_grid_positions(start, t, h // merge_size, w // merge_size, interval))
            start += max(h, w) // merge_size
    positions = torch.cat(chunks, dim=1)
    return positions, int(positions.max()) + 1 - positions.shape[1]


def _grid_positions(start: int, t: int, h: int, w: int, interval: float = 1.0) -> torch.Tensor:
    """[3, t*h*w] positions of a run's merged tokens, in the tower's row-major order."""
    temporal = (torch.arange(t) * interval).long()
    tt, hh, ww = torch.meshgrid(temporal, torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start
