"""Probe: the bench Qwen2-VL tower's blocks + merger through OpenVINO, against the torch tower, same run.

    .venv/bin/pip install openvino && .venv/bin/python bench/openvino_tower.py [--rounds 4]

Not an encoder backend yet (docs: README "Performance"): the tower's data-dependent parts (position ids,
cu_seqlens, the rotary tables) are computed in torch and fed as inputs; only the blocks and the merger are
converted (traced with one 1024x1024 image's shapes). Prints conversion and compile time, seconds per
forward for OpenVINO bf16 / f32 and the torch bf16 tower (the encoder's default path), and the cosine of
OpenVINO's output against the torch float32 tower.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ensure_model, machine, photo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    import openvino as ov
    import torch
    from transformers.models.qwen2_vl.modeling_qwen2_vl import get_vision_position_ids

    from services.vision_encoder import engine as module
    from shared.images import load_image

    model = ensure_model("qwen2_vl")
    with mock.patch.object(module, "use_fast_rotary", lambda tower: None):  # its in-place ops do not convert
        reference = module.VisionEngine(model, dtype=torch.float32)
    tower = reference.tower
    inputs = reference.preprocess([load_image(photo(1024, 1024, seed=3))])

    class Blocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tower = tower  # a submodule: its weights are the graph's parameters

        def forward(self, h, cos, sin, cu):
            for block in self.tower.blocks:
                h = block(h, cu_seqlens=cu, position_embeddings=(cos, sin))
            return self.tower.merger(h)

    with torch.no_grad():
        h = tower.patch_embed(inputs[0].pixel_values)
        cos, sin = tower.rotary_pos_emb(h, get_vision_position_ids(torch.tensor([inputs[0].grid_thw]),
                                                                    tower.spatial_merge_size, kwargs={}))
        cu = torch.tensor([0, h.shape[0]], dtype=torch.int32)
        expected = Blocks()(h, cos, sin, cu)
        start = time.perf_counter()
        converted = ov.convert_model(Blocks().eval(), example_input=(h, cos, sin, cu))
    print(f"{model.name}, {h.shape[0]} patches; CPU: {machine()}; openvino {ov.__version__}")
    print(f"convert {time.perf_counter() - start:.1f} s")
    feed = [t.numpy() for t in (h, cos, sin, cu)]
    for hint in ("bf16", "f32"):
        start = time.perf_counter()
        request = ov.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": hint}).create_infer_request()
        compile_s = time.perf_counter() - start
        out = request.infer(feed)[0]
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            out = request.infer(feed)[0]
            times.append(time.perf_counter() - start)
        cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(out).flatten(), expected.flatten(), dim=0)
        print(f"openvino {hint}: compile {compile_s:.2f} s, forward {min(times):.2f}-{max(times):.2f} s, "
              f"cosine vs torch fp32 {cosine:.5f}")
    ours = module.VisionEngine(model, dtype=torch.bfloat16)
    times = []
    with torch.inference_mode():
        ours.encode_inputs(inputs)
        for _ in range(args.rounds):
            start = time.perf_counter()
            ours.encode_inputs(inputs)
            times.append(time.perf_counter() - start)
    print(f"torch bf16 (the encoder's default): forward {min(times):.2f}-{max(times):.2f} s")


if __name__ == "__main__":
    main()
