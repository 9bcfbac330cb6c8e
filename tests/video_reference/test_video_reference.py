"""shared/video.py and the video prompt of shared/processor.py against the official transformers processors
(`Qwen2VLVideoProcessor` for Qwen2-VL and Qwen2.5-VL, `Qwen3VLVideoProcessor`, and the `Qwen*VLProcessor` that
holds them), which need torchvision: `make test-video-reference` runs this in .cache/video-reference/venv.

The official side is fed what a user of transformers would feed it: every frame PyAV decodes, as a uint8
array [N, H, W, 3], with `VideoMetadata(total_num_frames=N, fps=<stream average_rate>, ...)`, sampling on
(`do_sample_frames=True`) at our sampling's fps, frame bounds and pixel bounds, and the total pixel budget of
qwen-vl-utils (`cap_pixels_per_frame=True`), which we follow. Ours is fed the encoded bytes.

Compared: sampled frame indices, resized frames (uint8 levels), grid_thw and pixel values (exactly), Qwen2.5-VL's
second_per_grid_t, Qwen3-VL's per-temporal-patch timestamps, and the decoder prompt (input_ids,
mm_token_type_ids). The largest pixel difference per family is printed at the end of the run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, AutoVideoProcessor
from transformers.image_utils import SizeDict
from transformers.video_utils import VideoMetadata

from conftest import CLIPS, FAMILIES, ClipSpec, clip
from shared.families import get_family
from shared.processor import PromptBuilder
from shared.video import VideoLimits, VideoPreprocessor, VideoSampling, probe, read_clip

# float32 on both sides with the same operations: equal, not close. Raise only with a stated reason.
PIXEL_ATOL = 0.0
TIME_ATOL = 1e-9
QUESTION = "What happens in this clip?"
LIMITS = VideoLimits()


def sampling_variants(factor: int) -> dict[str, dict]:
    """Request-level sampling besides the checkpoint's defaults: below min_frames (fps 0.5 on a 3 s clip),
    and dense at small pixel bounds (max_frames and the pixel floor both bind)."""
    return {
        "default": {},
        "fps0.5": {"fps": 0.5},
        "fps8-max24-small": {"fps": 8.0, "max_frames": 24, "min_pixels": factor * factor * 4,
                             "max_pixels": factor * factor * 96},
    }


VARIANTS = list(sampling_variants(28))
MAX_DIFF: dict[str, float] = {}  # family -> largest |ours - official| over its pixel values


@pytest.fixture(scope="session")
def ours(tiny_models) -> dict[str, VideoPreprocessor]:
    return {family: VideoPreprocessor.from_pretrained(path, family) for family, path in tiny_models.items()}


def our_sampling(pre: VideoPreprocessor, variant: str) -> VideoSampling:
    return pre.sampling(LIMITS, **sampling_variants(pre.factor)[variant])


def metadata(decoded) -> VideoMetadata:
    n, h, w, _ = decoded.frames.shape
    return VideoMetadata(total_num_frames=n, fps=decoded.fps, width=w, height=h, duration=decoded.duration)


def official_kwargs(s: VideoSampling) -> dict:
    return dict(do_sample_frames=True, fps=s.fps, min_frames=s.min_frames, max_frames=s.max_frames,
                size={"shortest_edge": s.min_pixels, "longest_edge": s.max_pixels}, cap_pixels_per_frame=True)


def official_video_processor(path: str, s: VideoSampling):
    """The checkpoint's video processor, with our sampling's frame bounds set on it too: Qwen3VLVideoProcessor's
    sample_frames reads self.min_frames / self.max_frames, not the call's."""
    vp = AutoVideoProcessor.from_pretrained(path, min_frames=s.min_frames, max_frames=s.max_frames)
    assert (vp.min_frames, vp.max_frames) == (s.min_frames, s.max_frames)
    return vp


_OURS: dict[tuple, object] = {}
_OFFICIAL: dict[tuple, dict] = {}


def our_inputs(pre: VideoPreprocessor, family: str, spec: ClipSpec, s: VideoSampling):
    """shared.video's VideoInputs for the encoded clip (cached: several tests read it)."""
    key = (family, spec.id, s)
    if key not in _OURS:
        _OURS[key] = pre.preprocess(clip(spec)[0], s, LIMITS)
    return _OURS[key]


def official(path: str, family: str, spec: ClipSpec, s: VideoSampling) -> dict:
    """The official processor's outputs for one clip in a one-question prompt (cached: several tests read it)."""
    key = (family, spec.id, s)
    if key not in _OFFICIAL:
        _, decoded = clip(spec)
        processor = AutoProcessor.from_pretrained(path)
        processor.video_processor = official_video_processor(path, s)
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
        text = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out = processor(text=[text], videos=[decoded.frames], video_metadata=[metadata(decoded)],
                        return_metadata=True, return_tensors="pt", **official_kwargs(s))
        out = dict(out)
        out["messages"] = messages
        out["processor"] = processor
        _OFFICIAL[key] = out
    return _OFFICIAL[key]


def _record(family: str, diff: float) -> None:
    MAX_DIFF[family] = max(MAX_DIFF.get(family, 0.0), diff)


def summary_lines() -> list[str]:
    return [f"{family}: max |ours - official| pixel value = {MAX_DIFF[family]:g}" for family in FAMILIES
            if family in MAX_DIFF]


# -- the checkpoint's values --

@pytest.mark.parametrize("family", FAMILIES)
def test_defaults_are_the_official_processors(tiny_models, ours, family):
    """The checkpoint's video_preprocessor_config.json loads as the official class, with our values; and our
    family defaults are that class's own (fps: qwen-vl-utils' 2 for the Qwen2 rule, whose class has none)."""
    vp = AutoVideoProcessor.from_pretrained(tiny_models[family])
    expected = {"qwen2_vl": "Qwen2VLVideoProcessor", "qwen2_5_vl": "Qwen2VLVideoProcessor",
                "qwen3_vl": "Qwen3VLVideoProcessor"}[family]
    assert type(vp).__name__ == expected
    pre = ours[family]
    d = pre.defaults
    assert (d.min_pixels, d.max_pixels) == (vp.size["shortest_edge"], vp.size["longest_edge"])
    assert (d.min_frames, d.max_frames, d.fps) == (vp.min_frames, vp.max_frames, vp.fps)
    assert (pre.patch_size, pre.temporal_patch_size, pre.merge_size) == (vp.patch_size, vp.temporal_patch_size,
                                                                         vp.merge_size)
    assert pre.mean == list(vp.image_mean) and pre.std == list(vp.image_std)
    assert pre.rescale_factor == vp.rescale_factor and pre.max_video_tokens == vp.max_video_tokens
    assert vp.cap_pixels_per_frame is True and vp.do_sample_frames is True

    cls = type(vp)
    assert (d.min_pixels, d.max_pixels) == (cls.size["shortest_edge"], cls.size["longest_edge"])
    assert (d.min_frames, d.max_frames) == (cls.min_frames, cls.max_frames)
    assert (pre.patch_size, pre.temporal_patch_size, pre.merge_size) == (cls.patch_size, cls.temporal_patch_size,
                                                                         cls.merge_size)
    assert pre.mean == list(cls.image_mean) and pre.std == list(cls.image_std)
    assert pre.max_video_tokens == cls.max_video_tokens
    if family == "qwen3_vl":
        assert d.fps == cls.fps


# -- the clip as the container holds it --

@pytest.mark.parametrize("spec", CLIPS, ids=lambda c: c.id)
def test_probe_counts_what_pyav_decodes(spec):
    data, decoded = clip(spec)
    total, fps, width, height = probe(data, LIMITS)
    assert total == decoded.total == spec.frames
    assert fps == decoded.fps
    assert (width, height) == (spec.width, spec.height) == (decoded.frames.shape[2], decoded.frames.shape[1])


# -- sampling, resize, pixels --

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("spec", CLIPS, ids=lambda c: c.id)
@pytest.mark.parametrize("family", FAMILIES)
def test_frame_indices_match(tiny_models, ours, family, spec, variant):
    pre = ours[family]
    s = our_sampling(pre, variant)
    _, decoded = clip(spec)
    vp = official_video_processor(tiny_models[family], s)
    md = metadata(decoded)
    kwargs = {k: v for k, v in official_kwargs(s).items() if k not in ("do_sample_frames", "size",
                                                                        "cap_pixels_per_frame")}
    theirs = [int(i) for i in vp.sample_frames(md, temporal_patch_size=vp.temporal_patch_size, **kwargs)]
    assert pre.frame_indices(decoded.total, decoded.fps, s) == theirs


@pytest.mark.parametrize("spec", CLIPS, ids=lambda c: c.id)
@pytest.mark.parametrize("family", FAMILIES)
def test_resized_frames_match(tiny_models, ours, family, spec):
    """Our decoded, resized frames (uint8) are the official resize of the same frames: the place a pixel
    difference comes from, in levels."""
    pre = ours[family]
    s = our_sampling(pre, "default")
    data, decoded = clip(spec)
    got = read_clip(data, pre, s, LIMITS)
    vp = official_video_processor(tiny_models[family], s)
    raw = torch.from_numpy(decoded.frames[list(got.indices)]).permute(0, 3, 1, 2).contiguous()
    want = vp.resize(raw[None], size=SizeDict(shortest_edge=s.min_pixels, longest_edge=s.max_pixels),
                     resample=vp.resample, factor=pre.factor, temporal_factor=pre.temporal_patch_size,
                     cap_pixels_per_frame=True)[0]
    assert got.frames.shape == want.shape and got.frames.dtype == want.dtype == torch.uint8
    levels = (got.frames.int() - want.int()).abs()
    assert int(levels.max()) == 0, (
        f"resized frames differ by up to {int(levels.max())} levels at {int((levels > 0).sum())} of "
        f"{levels.numel()} values ({tuple(raw.shape[-2:])} -> {tuple(want.shape[-2:])})")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("spec", CLIPS, ids=lambda c: c.id)
@pytest.mark.parametrize("family", FAMILIES)
def test_pixels_and_grid_match(tiny_models, ours, family, spec, variant):
    pre = ours[family]
    s = our_sampling(pre, variant)
    got = our_inputs(pre, family, spec, s)
    want = official(tiny_models[family], family, spec, s)
    assert got.grid_thw == tuple(int(v) for v in want["video_grid_thw"][0])
    assert got.pixel_values.dtype == want["pixel_values_videos"].dtype == torch.float32
    assert got.pixel_values.shape == want["pixel_values_videos"].shape
    diff = float((got.pixel_values - want["pixel_values_videos"]).abs().max())
    _record(family, diff)
    assert diff <= PIXEL_ATOL, f"pixel values differ by up to {diff:g}"


# -- timing and the decoder prompt, through the whole official processor --

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("spec", CLIPS, ids=lambda c: c.id)
@pytest.mark.parametrize("family", FAMILIES)
def test_timing_matches(tiny_models, ours, family, spec, variant):
    pre = ours[family]
    s = our_sampling(pre, variant)
    _, decoded = clip(spec)
    got = our_inputs(pre, family, spec, s)
    ref = official(tiny_models[family], family, spec, s)
    (md,) = ref["video_metadata"]
    indices = [int(i) for i in md.frames_indices]
    assert pre.frame_indices(decoded.total, decoded.fps, s) == indices
    assert len(got.video.timestamps) == got.grid_thw[0]
    if family == "qwen2_5_vl":
        # Qwen2_5_VLProcessor computes it in Python floats and returns it as a float32 tensor (what the model's
        # M-RoPE then reads): ours, in float64, is that value before the rounding to float32.
        (want,) = ref["second_per_grid_ts"].tolist()
        assert ref["second_per_grid_ts"].dtype == torch.float32
        exact = pre.temporal_patch_size / md.sampled_fps
        assert got.video.second_per_grid_t == exact, (
            f"second_per_grid_t {got.video.second_per_grid_t!r} != official {exact!r} (before float32)")
        assert torch.tensor(got.video.second_per_grid_t, dtype=torch.float32).item() == want
    if family == "qwen3_vl":
        processor = ref["processor"]
        want = processor._calculate_timestamps(indices, md.fps, processor.video_processor.temporal_patch_size)
        assert np.allclose(got.video.timestamps, want, rtol=0, atol=TIME_ATOL), (
            f"timestamps {got.video.timestamps} != official {want}")
        assert [f"{t:.1f}" for t in got.video.timestamps] == [f"{t:.1f}" for t in want]


@pytest.mark.parametrize("variant", ["default", "fps8-max24-small"])
@pytest.mark.parametrize("spec", CLIPS, ids=lambda c: c.id)
@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_matches(tiny_models, ours, family, spec, variant):
    """PromptBuilder's ids for a message with a video part are the official processor's input_ids for the same
    chat-templated text, and mm_token_type_ids (2 at video tokens) too."""
    pre = ours[family]
    s = our_sampling(pre, variant)
    got = our_inputs(pre, family, spec, s)
    ref = official(tiny_models[family], family, spec, s)
    builder = PromptBuilder.from_pretrained(tiny_models[family], pre.merge_size, get_family(family).video_prompt)
    prompt = builder(ref["messages"], [got.grid_thw], [got.video])
    want_ids, want_mm = ref["input_ids"][0], ref["mm_token_type_ids"][0]
    if not torch.equal(prompt.input_ids, want_ids):
        first = next((i for i, (a, b) in enumerate(zip(prompt.input_ids.tolist(), want_ids.tolist())) if a != b),
                     min(len(prompt.input_ids), len(want_ids)))
        raise AssertionError(
            f"input_ids differ from position {first} (ours {len(prompt.input_ids)} ids, official {len(want_ids)}):\n"
            f"ours:     {builder.tokenizer.decode(prompt.input_ids[first:first + 12])!r}\n"
            f"official: {builder.tokenizer.decode(want_ids[first:first + 12])!r}")
    assert torch.equal(prompt.mm_token_type_ids, want_mm.long())
    assert int((want_mm == 2).sum()) == got.grid_thw[0] * got.grid_thw[1] * got.grid_thw[2] // pre.merge_size ** 2
