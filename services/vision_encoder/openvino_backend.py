"""The vision tower through OpenVINO (`VLSPLIT_ENCODER_BACKEND=openvino`), behind the same payloads.

What is converted: the tower from the patch embedding to the mergers (blocks, Qwen3-VL's deepstack
mergers), as ONE graph with a dynamic patch count (`openvino.convert_model` of `TowerGraph`, traced on
a small grid), so any image size runs on the same compiled model. What stays in torch: the parts that
depend on the grid's values rather than its shape, fed as graph inputs (`TowerPrelude`): the rotary
cos/sin tables, Qwen2.5-VL's window order and window layout, Qwen3-VL's interpolated position
embedding. The torch tower (engine.py, backend "torch") remains the exact reference; the tests bound
this one's distance to it (tests/test_openvino_backend.py).

Several images in one encode call: the graph runs once per attention segment (an image, or one frame
of a clip: the three towers' cu_seqlens split per frame, so no token ever attends across segments and
the mergers and position tables are per patch). Each run is then plain full attention over its own
tokens, with no S x S mask (1 GiB in float32 at the largest image) and no padding between images of
different sizes; a segment has thousands of rows, so its GEMMs lose nothing to running alone.
Qwen2.5-VL's window layers attend within windows of at most 64 patches: the window-ordered tokens are
gathered into [windows, longest window] with a key mask for the short edge windows, attended as a
batch, and gathered back (`pad_index`, `key_mask`, `unpad_index`, all computed here in torch).

Conversion is cached on disk as OpenVINO IR, in `<cache dir>/<fingerprint>-<weights>-<compression>-g<N>`
(N: GRAPH_VERSION, bumped when TowerGraph changes). The IR keeps float32 weights; the serving dtype
is the compile-time INFERENCE_PRECISION_HINT (bf16 only where shared/hardware.py finds native bf16), so
float32 and bfloat16 replicas share one IR. `int8` (the encoder's `quantize`) compresses the IR's
weights with `nncf.compress_weights` (INT8_SYM: per output channel, symmetric, as shared/quantize.py),
a separate entry. A directory is written under a temporary name and renamed into place, so replicas
starting together never read half a model; `meta.json`, written last, names the file sizes, and an
entry that does not match them or fails to read is moved aside and converted again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers.vision_utils import (get_vision_interpolation_indices_and_weights, get_vision_position_ids,
                                       get_vision_window_index)

log = logging.getLogger("vlsplit.vision")

GRAPH_VERSION = 1
INPUTS = ("pixels", "cos", "sin", "pos_embeds", "pad_index", "key_mask", "unpad_index")  # TowerGraph.forward's
HEAVY_MODULES = ("patch_embed", "blocks", "merger", "deepstack_merger_list")  # in the graph, not in torch
EXAMPLE_GRID = (1, 12, 16)  # traced shapes only; every input dimension is dynamic
INSTALL_HINT = "pip install 'vlsplit[openvino]' (or: pip install openvino nncf)"


def import_openvino():
    """The openvino module, or a start-up error naming the setting and the install command."""
    try:
        import openvino
    except ImportError as exc:
        raise ValueError(f"VLSPLIT_ENCODER_BACKEND=openvino (--backend openvino) needs the openvino package: "
                           f"{INSTALL_HINT}") from exc
    return openvino


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attend(attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            window: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
    """A Qwen-VL vision attention over one segment: x [S, C], cos/sin [S, D]."""
    seq = x.shape[0]
    q, k, v = attn.qkv(x).reshape(seq, 3, attn.num_heads, -1).unbind(1)  # each [S, H, D]
    c, s = cos[:, None, :], sin[:, None, :]
    q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
    if window is None:
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, H, S, D]
        out = nn.functional.scaled_dot_product_attention(q, k, v, scale=attn.scaling)[0].transpose(0, 1)
    else:
        pad_index, key_mask, unpad_index = window  # [W * L], [W, L], [S]
        shape = (key_mask.shape[0], key_mask.shape[1], attn.num_heads, q.shape[-1])
        q, k, v = (t[pad_index].reshape(shape).transpose(1, 2) for t in (q, k, v))  # [W, H, L, D]
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :],
                                                         scale=attn.scaling)
        out = out.transpose(1, 2).reshape(-1, attn.num_heads, q.shape[-1])[unpad_index]  # [S, H, D]
    return attn.proj(out.reshape(seq, -1))


class TowerGraph(nn.Module):
    """What is converted: patch embedding -> blocks -> merger (+ deepstack mergers), for one segment."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower.requires_grad_(False)  # a submodule: its weights become the graph's constants
        embed = tower.patch_embed  # fast_ops.LinearPatchEmbed; its weight is a view, not a parameter
        self.patch_weight = nn.Parameter(embed.weight.detach(), requires_grad=False)
        self.full_layers = set(getattr(tower, "fullatt_block_indexes", None) or range(len(tower.blocks)))
        self.deepstack = list(getattr(tower, "deepstack_visual_indexes", None) or [])

    def forward(self, pixels, cos, sin, pos_embeds=None, pad_index=None, key_mask=None, unpad_index=None):
        h = nn.functional.linear(pixels, self.patch_weight, self.tower.patch_embed.bias)  # [S, C]
        if pos_embeds is not None:  # Qwen3-VL
            h = h + pos_embeds
        window = None if pad_index is None else (pad_index, key_mask, unpad_index)
        levels = []
        for i, block in enumerate(self.tower.blocks):
            h = h + _attend(block.attn, block.norm1(h), cos, sin, None if i in self.full_layers else window)
            h = h + block.mlp(block.norm2(h))
            if i in self.deepstack:
                levels.append(self.tower.deepstack_merger_list[self.deepstack.index(i)](h))
        return (self.tower.merger(h), *levels)


@dataclass
class Segment:
    """One graph run's inputs (numpy, as OpenVINO takes them) and, for Qwen2.5-VL, its output order."""

    feed: dict[str, np.ndarray]
    reverse: torch.Tensor | None = None  # merged tokens, window order -> raster order


class TowerPrelude:
    """The data-dependent inputs of TowerGraph, computed with the torch tower's own helpers."""

    def __init__(self, tower: nn.Module):
        self.tower = tower
        self.merge = tower.spatial_merge_size
        self.windowed = hasattr(tower, "fullatt_block_indexes")
        self.interpolated = hasattr(tower, "pos_embed")

    def segments(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> list[Segment]:
        out, start = [], 0
        for t, h, w in grids:
            for _ in range(t):
                out.append(self.segment(pixel_values[start:start + h * w].float(), (1, h, w)))
                start += h * w
        return out

    @torch.inference_mode()
    def segment(self, pixels: torch.Tensor, grid: tuple[int, int, int]) -> Segment:
        grid_thw = torch.tensor([grid])
        cos, sin = self.tower.rotary_pos_emb(pixels, get_vision_position_ids(grid_thw, self.merge))
        feed = {}
        reverse = None
        if self.interpolated:
            indices, weights = get_vision_interpolation_indices_and_weights(
                grid_thw, num_grid_per_side=self.tower.num_grid_per_side, mode=self.tower.interpolation_mode,
                align_corners=self.tower.interpolation_align_corners, spatial_merge_size=self.merge)
            feed["pos_embeds"] = (self.tower.pos_embed(indices) * weights[:, :, None]).sum(1).float()
        if self.windowed:
            window_index, cu_windows = get_vision_window_index(grid_thw, self.merge, self.tower.window_size,
                                                               self.tower.patch_size)
            pixels, cos, sin = (self.permute(x, window_index) for x in (pixels, cos, sin))
            feed.update(window_layout(cu_windows))
            reverse = torch.argsort(window_index)
        feed = {"pixels": pixels, "cos": cos.float(), "sin": sin.float(), **feed}
        return Segment({name: x.contiguous().numpy() for name, x in feed.items()}, reverse)

    def permute(self, x: torch.Tensor, window_index: torch.Tensor) -> torch.Tensor:
        """Rows in window order, merge units kept together (the tower's permute_input_for_window_attn)."""
        unit = self.merge**2
        return x.reshape(-1, unit, x.shape[-1])[window_index].reshape(x.shape)


def window_layout(cu_windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Windows [cu[i], cu[i+1]) as a padded [W, L] batch: gather index, key mask, and the way back."""
    lengths = (cu_windows[1:] - cu_windows[:-1]).long()
    longest = int(lengths.max())
    slots = torch.arange(longest)
    valid = slots[None, :] < lengths[:, None]  # [W, L]
    pad_index = torch.where(valid, cu_windows[:-1, None].long() + slots[None, :], 0)
    unpad_index = (torch.arange(len(lengths))[:, None] * longest + slots[None, :])[valid]
    return {"pad_index": pad_index.reshape(-1), "key_mask": valid, "unpad_index": unpad_index}


class OpenVinoTower:
    """The converted tower, compiled for the serving dtype: `__call__` = the torch tower's outputs."""

    def __init__(self, compiled, prelude: TowerPrelude, weight_bytes: int, source: str, load_s: float):
        self.compiled = compiled
        self.prelude = prelude
        self.weight_bytes = weight_bytes
        self.source = source  # "converted" (this start converted the tower) or "cache" (loaded the IR)
        self.load_s = load_s
        self.version = import_openvino().__version__.split("-")[0]  # e.g. "2026.4.1"
        self.request = compiled.create_infer_request()
        self.inputs = [port.get_any_name() for port in compiled.inputs]
        if set(self.inputs) - set(INPUTS):
            raise ValueError(f"the OpenVINO tower's inputs {self.inputs} are not TowerGraph's {INPUTS}")

    def __call__(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (merged [sum tokens, out], deepstack levels, each [sum tokens, out]), in float32."""
        runs = []
        for segment in self.prelude.segments(pixel_values, grids):
            results = self.request.infer({name: segment.feed[name] for name in self.inputs})
            outputs = [torch.from_numpy(results[port].copy()) for port in self.compiled.outputs]
            if segment.reverse is not None:
                outputs = [x[segment.reverse] for x in outputs]
            runs.append(outputs)
        merged, *levels = (torch.cat(parts) for parts in zip(*runs))
        return merged, levels


def example_inputs(tower: nn.Module) -> dict[str, torch.Tensor]:
    """TowerGraph's inputs for EXAMPLE_GRID (the trace's shapes), from random pixels."""
    t, h, w = EXAMPLE_GRID
    embed = tower.patch_embed
    pixels = torch.randn(t * h * w, embed.weight.shape[1])
    segment = TowerPrelude(tower).segment(pixels, EXAMPLE_GRID)
    return {name: torch.from_numpy(x) for name, x in segment.feed.items()}


def convert(tower: nn.Module, compress: str):
    """The OpenVINO model of `tower` (float32 weights; `compress` "int8": nncf INT8_SYM weights)."""
    ov = import_openvino()
    example = example_inputs(tower)
    graph = TowerGraph(tower).eval()
    with torch.inference_mode(False), torch.no_grad():
        model = ov.convert_model(graph, example_input=example)
    names = [n for n in INPUTS if n in example]
    if len(model.inputs) != len(names):
        raise RuntimeError(f"the converted tower has {len(model.inputs)} inputs, TowerGraph was given {names}")
    for port, name in zip(model.inputs, names):  # the ports follow forward's order
        port.get_tensor().set_names({name})
    if compress == "int8":
        import nncf
        from nncf.common.logging import nncf_logger

        nncf_logger.setLevel(logging.WARNING)  # no statistics table on stdout
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_SYM)
    return model


class IrCache:
    """Converted towers on disk: one directory per key, written atomically, checked when read."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str):
        """The cached model, or None (absent, or broken: then moved aside and removed)."""
        ov = import_openvino()
        entry = self.path(key)
        if not entry.is_dir():
            return None
        try:
            meta = json.loads((entry / "meta.json").read_text())
            for name, size in meta["files"].items():
                if (entry / name).stat().st_size != size:
                    raise ValueError(f"{name} is {(entry / name).stat().st_size} bytes, meta.json says {size}")
            return ov.Core().read_model(entry / "tower.xml")
        except Exception as exc:  # any damage: convert again rather than fail the start
            log.warning("openvino IR cache entry %s is unusable (%s): converting again", entry, exc)
            self._discard(entry)
            return None

    def save(self, key: str, model) -> None:
        ov = import_openvino()
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        ov.save_model(model, tmp / "tower.xml", compress_to_fp16=False)
        files = {name: (tmp / name).stat().st_size for name in ("tower.xml", "tower.bin")}
        (tmp / "meta.json").write_text(json.dumps({"key": key, "openvino": ov.__version__, "files": files}))
        try:
            os.rename(tmp, self.path(key))
        except OSError:  # another replica renamed its copy first: the same model, keep theirs
            shutil.rmtree(tmp, ignore_errors=True)

    def _discard(self, entry: Path) -> None:
        aside = entry.with_name(f".{entry.name}.bad-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(entry, aside)
        except OSError:
            return
        shutil.rmtree(aside, ignore_errors=True)


def cache_key(fingerprint: str, compress: str) -> str:
    return f"{fingerprint}-f32-{'int8' if compress == 'int8' else 'none'}-g{GRAPH_VERSION}"


def compile_config(dtype: torch.dtype, threads: int) -> dict:
    """bf16 inference only where the CPU multiplies it natively (shared/hardware.py), else f32."""
    from shared.hardware import cpu_features

    bf16 = dtype == torch.bfloat16 and cpu_features().native_bf16
    return {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32", "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": str(threads)}


def open_tower(load_tower, fingerprint: str, dtype: torch.dtype, compress: str, cache_root: Path,
               threads: int) -> tuple[OpenVinoTower, nn.Module]:
    """Load the IR from the cache or convert (and cache) it; compile it.

    `load_tower(full)` builds the torch tower: with every weight (full, for a conversion) or only the
    weights the prelude needs. Returns the OpenVINO tower and the torch tower without its heavy modules.
    """
    ov = import_openvino()
    start = time.perf_counter()
    cache = IrCache(cache_root)
    key = cache_key(fingerprint, compress)
    model = cache.load(key)
    source = "cache" if model is not None else "converted"
    tower = load_tower(full=model is None)
    if model is None:
        cache.save(key, convert(tower, compress))
        model = cache.load(key)  # compile what a cached start compiles: saving transforms the graph a little
        if model is None:
            raise RuntimeError(f"the OpenVINO IR just written to {cache.path(key)} cannot be read back")
    for name in HEAVY_MODULES:
        if hasattr(tower, name):
            setattr(tower, name, None)  # their weights live in the OpenVINO model now
    ready_s = time.perf_counter() - start
    config = compile_config(dtype, threads)
    compiled = ov.Core().compile_model(model, "CPU", config)
    total_s = time.perf_counter() - start
    weight_bytes = (cache.path(key) / "tower.bin").stat().st_size
    log.info("openvino tower %s %s in %.2fs, compiled (%s) in %.2fs; openvino %s",
             "converted and cached in" if source == "converted" else "loaded from the IR cache",
             cache.path(key), ready_s, config["INFERENCE_PRECISION_HINT"], total_s - ready_s, ov.__version__,
             extra={"openvino_source": source, "openvino_ir": str(cache.path(key))})
    return OpenVinoTower(compiled, TowerPrelude(tower), weight_bytes, source, total_s), tower
