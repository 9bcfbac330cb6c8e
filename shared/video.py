"""Untrusted clip bytes -> sampled, resized frames -> the tower's video patches (no torchvision).

The official `Qwen2VLVideoProcessor` (Qwen2-VL, Qwen2.5-VL) and `Qwen3VLVideoProcessor` import
torchvision, which does not import beside the CPU torch wheel, so this module does what they do with
PyAV (FFmpeg in its wheel) and plain torch ops; `make test-video-reference` compares the two in an
environment of its own. What they do, per family (`Family.video.rule`):

- frame count from the clip's frame count N and rate r at `fps` frames a second:
  qwen2: n = floor(clamp(N / r * fps, min_frames, floor(min(max_frames, N) / 2) * 2) / 2) * 2,
         indices = arange(0, N, N / n) truncated;
  qwen3: n = clamp(int(N / r * fps), min_frames, min(max_frames, N)), indices = linspace(0, N - 1, n) rounded.
- one size for every frame, the family's `smart_resize` under the total pixel budget qwen-vl-utils
  applies (the processors' `cap_pixels_per_frame=True`), bicubic with antialiasing on the uint8 frames
  (torch's uint8 kernel, which torchvision's resize calls on the CPU), then (x - 255 mean) / (255 std)
  in float32;
- frames padded to a multiple of the temporal patch (2) by repeating the last, then patchified as
  the image processor does: pixel values [t*h*w, C*2*P*P], grid (t, h, w).

Timing for the decoder (`VideoTiming`): Qwen2.5-VL's `second_per_grid_t` = temporal patch / sampled
rate (n / N * r), which spaces its temporal M-RoPE positions; Qwen3-VL's per-temporal-patch
timestamps (the mean of the patch's first and last frame time), which its prompt spells out as
`<t.t seconds>` before each frame.

Decoding never holds more than the sampled frames, each resized as soon as it is decoded; every
resource it can spend is bounded by `VideoLimits` and each refusal names its setting. Every failure
is a `BadImage` (bad input) or `TooLarge`; no PyAV exception escapes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import BadImage, TooLarge
from .payload import VideoTiming

MiB = 1 << 20
VIDEO_CONFIG = "video_preprocessor_config.json"
# Containers FFmpeg may open (its names, as `container.format.name` lists them): mp4/mov/m4a share one
# demuxer, webm is matroska's. Everything else (image2, concat, hls, ...) is refused.
ALLOWED_CONTAINERS = frozenset({"mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "gif", "avi"})


@dataclass(frozen=True)
class VideoSampling:
    """How a clip becomes frames: a request's `VideoParams` (shared/image_ids.py, which the cache key
    hashes) resolved against the checkpoint's defaults and checked against the limits.

    min_pixels / max_pixels are the processor's `size` (shortest_edge / longest_edge): per frame for
    qwen2, over all frames for qwen3 (each family's own meaning)."""

    fps: float
    min_frames: int
    max_frames: int
    min_pixels: int
    max_pixels: int


@dataclass(frozen=True)
class VideoLimits:
    """Upper bounds for one clip; the refusals name these settings."""

    max_bytes: int = 64 * MiB  # VLSPLIT_MAX_VIDEO_BYTES
    max_duration_s: float = 600.0  # VLSPLIT_MAX_VIDEO_SECONDS
    max_frames: int = 768  # VLSPLIT_MAX_VIDEO_FRAMES: sampled frames
    max_frame_pixels: int = 3840 * 2160  # VLSPLIT_MAX_VIDEO_FRAME_PIXELS: the clip's own resolution
    max_tokens: int = 16384  # VLSPLIT_MAX_VIDEO_TOKENS: the clip's tokens in a prompt
    decode_timeout_s: float = 60.0  # VLSPLIT_VIDEO_DECODE_TIMEOUT_S
    max_fps: float = 8.0  # VLSPLIT_MAX_VIDEO_FPS: the highest sampling rate a request may ask for
    max_source_frames: int = 216_000  # VLSPLIT_MAX_VIDEO_SOURCE_FRAMES: frames the container may hold
    tokens_setting: str = "VLSPLIT_MAX_VIDEO_TOKENS"  # what max_tokens came from, for the refusal


@dataclass(frozen=True)
class Clip:
    """Sampled frames, resized: [n, 3, h, w] uint8, and where they came from."""

    frames: torch.Tensor
    indices: tuple[int, ...]
    total_frames: int
    source_fps: float
    width: int
    height: int

    @property
    def duration_s(self) -> float:
        return self.total_frames / self.source_fps


@dataclass(frozen=True)
class VideoInputs:
    pixel_values: torch.Tensor  # [t*h*w, C * temporal_patch * patch * patch], float32
    grid_thw: tuple[int, int, int]
    video: VideoTiming


@dataclass(frozen=True)
class VideoRule:
    """A family's video processing: its published defaults and which of the two rules it follows."""

    rule: str  # "qwen2" | "qwen3"
    defaults: dict[str, Any]  # video_preprocessor_config.json values of the family's checkpoints


def smart_resize_qwen2(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    if max(height, width) / min(height, width) > 200:
        raise BadImage(f"a video frame of {width}x{height} has an aspect ratio over 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_qwen3(num_frames: int, height: int, width: int, temporal_factor: int, factor: int,
                       min_pixels: int, max_pixels: int) -> tuple[int, int]:
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise BadImage(f"a video frame of {width}x{height} has an aspect ratio over 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class VideoPreprocessor:
    """One checkpoint's video processing (defaults from its video_preprocessor_config.json, else the family's)."""

    def __init__(self, rule: VideoRule, config: dict[str, Any]):
        self.rule = rule.rule
        merged = {**rule.defaults, **config}
        size = merged.get("size") or {}
        self.patch_size = int(merged["patch_size"])
        self.temporal_patch_size = int(merged["temporal_patch_size"])
        self.merge_size = int(merged["merge_size"])
        self.mean = [float(v) for v in merged["image_mean"]]
        self.std = [float(v) for v in merged["image_std"]]
        self.rescale_factor = float(merged.get("rescale_factor", 1 / 255))
        self.max_video_tokens = int(merged["max_video_tokens"])
        self.defaults = VideoSampling(
            fps=float(merged.get("fps") or 2.0),
            min_frames=int(merged["min_frames"]),
            max_frames=int(merged["max_frames"]),
            min_pixels=int(size.get("shortest_edge", merged.get("min_pixels"))),
            max_pixels=int(size.get("longest_edge", merged.get("max_pixels"))),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, model_type: str) -> "VideoPreprocessor":
        from .families import get_family

        rule = get_family(model_type).video
        file = Path(path) / VIDEO_CONFIG
        config = json.loads(file.read_text()) if file.is_file() else {}
        return cls(rule, config)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def sampling(self, limits: VideoLimits, fps: float | None = None, min_frames: int | None = None,
                 max_frames: int | None = None, min_pixels: int | None = None,
                 max_pixels: int | None = None) -> VideoSampling:
        """A request's sampling: its values where given (0 / None = the checkpoint's), checked against `limits`."""
        s = self.defaults
        s = replace(s, fps=float(fps) if fps else s.fps, min_frames=min_frames or s.min_frames,
                    max_frames=max_frames or min(s.max_frames, limits.max_frames),
                    min_pixels=min_pixels or s.min_pixels, max_pixels=max_pixels or s.max_pixels)
        if not (math.isfinite(s.fps) and 0 < s.fps <= limits.max_fps):
            raise TooLarge(f"video fps {s.fps:g} must be in (0, {limits.max_fps:g}] (VLSPLIT_MAX_VIDEO_FPS)")
        if not 1 <= s.min_frames <= s.max_frames:
            raise BadImage(f"video min_frames {s.min_frames} and max_frames {s.max_frames} must satisfy "
                           "1 <= min_frames <= max_frames")
        if s.max_frames > limits.max_frames:
            raise TooLarge(f"video max_frames {s.max_frames} is over the limit of {limits.max_frames} frames "
                           "(VLSPLIT_MAX_VIDEO_FRAMES)")
        if not 1 <= s.min_pixels <= s.max_pixels:
            raise BadImage(f"video min_pixels {s.min_pixels} and max_pixels {s.max_pixels} must satisfy "
                           "1 <= min_pixels <= max_pixels")
        if s.max_pixels > self.defaults.max_pixels:
            raise TooLarge(f"video max_pixels {s.max_pixels} is over this model's {self.defaults.max_pixels}")
        return s

    # -- sampling and sizes (pure functions of the clip's frame count, rate and size) --

    def frame_indices(self, total_frames: int, source_fps: float, s: VideoSampling) -> list[int]:
        tp = self.temporal_patch_size
        if self.rule == "qwen3":
            n = int(total_frames / source_fps * s.fps)
            n = min(max(n, s.min_frames), s.max_frames, total_frames)
            indices = np.linspace(0, total_frames - 1, n).round().astype(int).tolist()
        else:
            ceiling = math.floor(min(s.max_frames, total_frames) / tp) * tp
            n = min(max(total_frames / source_fps * s.fps, s.min_frames), ceiling, total_frames)
            n = math.floor(n / tp) * tp
            if n <= 0:
                raise BadImage(f"the clip has {total_frames} frame(s); at least {tp} are needed")
            indices = torch.arange(0, total_frames, total_frames / n).int().tolist()
        if len(indices) < tp:
            raise BadImage(f"the clip has {total_frames} frame(s); at least {tp} are needed")
        return indices

    def frame_size(self, num_frames: int, height: int, width: int, s: VideoSampling) -> tuple[int, int]:
        """(height, width) every sampled frame is resized to, under the total pixel budget."""
        if self.rule == "qwen3":
            frame_cap = self.max_video_tokens * self.factor * self.factor
            per_frame = max(min(frame_cap, s.max_pixels // num_frames), int(s.min_pixels * 1.05))
            return smart_resize_qwen3(num_frames, height, width, self.temporal_patch_size, self.factor,
                                      s.min_pixels, per_frame * num_frames)
        total = int(self.max_video_tokens * self.factor * self.factor * 0.9)
        max_pixels = max(min(s.max_pixels, total * self.temporal_patch_size // num_frames), int(s.min_pixels * 1.05))
        return smart_resize_qwen2(height, width, self.factor, s.min_pixels, max_pixels)

    def tokens(self, num_frames: int, size: tuple[int, int]) -> int:
        """Prompt tokens of `num_frames` frames of `size` (after the spatial merge)."""
        t = -(-num_frames // self.temporal_patch_size)
        return t * (size[0] // self.factor) * (size[1] // self.factor)

    def timing(self, indices: list[int], total_frames: int, source_fps: float) -> VideoTiming:
        tp = self.temporal_patch_size
        padded = indices + [indices[-1]] * (-len(indices) % tp)
        times = [i / source_fps for i in padded]
        stamps = tuple((times[i] + times[i + tp - 1]) / 2 for i in range(0, len(times), tp))
        sampled_fps = len(indices) / total_frames * source_fps
        return VideoTiming(second_per_grid_t=tp / sampled_fps, timestamps=stamps)

    # -- pixels --

    @staticmethod
    def resize(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[n, 3, H, W] uint8 -> [n, 3, h, w] uint8, as torchvision's resize does on the CPU: bicubic with
        antialiasing on the uint8 frames themselves (torch's own uint8 kernel; no float round trip)."""
        return F.interpolate(frames, size=list(size), mode="bicubic", align_corners=False, antialias=True)

    def patches(self, clip: Clip) -> VideoInputs:
        """Normalised, temporally padded and patchified frames, and the clip's timing."""
        mean = torch.tensor(self.mean) * (1.0 / self.rescale_factor)
        std = torch.tensor(self.std) * (1.0 / self.rescale_factor)
        video = (clip.frames.to(torch.float32) - mean[:, None, None]) / std[:, None, None]
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if pad := -video.shape[0] % tp:
            video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
        n, c, h, w = video.shape
        gt, gh, gw = n // tp, h // p, w // p
        patches = video.view(gt, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        pixel_values = patches.reshape(gt * gh * gw, c * tp * p * p)
        return VideoInputs(pixel_values, (gt, gh, gw), self.timing(list(clip.indices), clip.total_frames, clip.source_fps))

    def preprocess(self, data: bytes, s: VideoSampling, limits: VideoLimits = VideoLimits()) -> VideoInputs:
        return self.patches(read_clip(data, self, s, limits))


# -- decoding --

def _open(data: bytes):
    import av

    try:
        container = av.open(BytesIO(data), mode="r", metadata_errors="ignore")
    except (av.FFmpegError, ValueError, OSError, UnicodeDecodeError) as exc:
        raise BadImage(f"not a readable video: {_reason(exc)}") from None
    names = set(container.format.name.split(","))
    if not names & ALLOWED_CONTAINERS:
        container.close()
        raise BadImage(f"unsupported video container {container.format.name!r}; "
                       "send mp4, mov, webm, mkv, avi or gif")
    if not container.streams.video:
        what = "audio only" if container.streams.audio else "no streams"
        container.close()
        raise BadImage(f"the file has no video stream ({what})")
    return container


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text[:200]


def probe(data: bytes, limits: VideoLimits) -> tuple[int, float, int, int]:
    """(frames, frames per second, width, height) of the clip's first video stream, counted from its
    packets (container headers are not trusted), with every bound checked."""
    import av

    if not data:
        raise BadImage("empty video: 0 bytes")
    if len(data) > limits.max_bytes:
        raise TooLarge(f"video is {len(data)} bytes; the limit is {limits.max_bytes} bytes (VLSPLIT_MAX_VIDEO_BYTES)")
    deadline = time.monotonic() + limits.decode_timeout_s
    container = _open(data)
    try:
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise BadImage("no decoder for the clip's video codec (an unknown or unsupported codec)")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if not (math.isfinite(fps) and 0 < fps <= 1000):
            raise BadImage(f"the video stream has no usable frame rate ({rate})")
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        _check_frame_size(width, height, limits)
        frames = 0
        for packet in container.demux(stream):
            if packet.size:
                frames += 1
                if frames > limits.max_source_frames:
                    raise TooLarge(f"the clip holds over {limits.max_source_frames} frames "
                                   "(VLSPLIT_MAX_VIDEO_SOURCE_FRAMES)")
                if frames % 256 == 0:
                    _check_deadline(deadline, limits)
        if frames == 0:
            raise BadImage("the video stream holds no frames")
        if frames / fps > limits.max_duration_s:
            raise TooLarge(f"the clip is {frames / fps:.1f} s long; the limit is {limits.max_duration_s:g} s "
                           "(VLSPLIT_MAX_VIDEO_SECONDS)")
        return frames, fps, width, height
    except av.FFmpegError as exc:
        raise BadImage(f"corrupt video: {_reason(exc)}") from None
    finally:
        container.close()


def read_clip(data: bytes, pre: VideoPreprocessor, s: VideoSampling, limits: VideoLimits = VideoLimits()) -> Clip:
    """The sampled frames of `data`, each resized on decode; refused before decoding a frame when the clip's
    token count is over `limits.max_tokens`."""
    import av

    total, fps, width, height = probe(data, limits)
    indices = pre.frame_indices(total, fps, s)
    if len(indices) > limits.max_frames:
        raise TooLarge(f"the clip samples to {len(indices)} frames; the limit is {limits.max_frames} "
                       "(VLSPLIT_MAX_VIDEO_FRAMES)")
    if width and height:  # checked again on the first decoded frame
        check_tokens(pre, len(indices), pre.frame_size(len(indices), height, width, s), limits)
    wanted = {}
    for position, index in enumerate(indices):
        wanted.setdefault(index, []).append(position)
    out: list[torch.Tensor | None] = [None] * len(indices)
    deadline = time.monotonic() + limits.decode_timeout_s
    size = None
    container = _open(data)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        last = max(wanted)
        for number, frame in enumerate(container.decode(stream)):
            _check_deadline(deadline, limits)
            if number > last:
                break
            if number not in wanted:
                continue
            if size is None:
                _check_frame_size(frame.width, frame.height, limits)
                size = pre.frame_size(len(indices), frame.height, frame.width, s)
                check_tokens(pre, len(indices), size, limits)
                first = (frame.width, frame.height)
            elif (frame.width, frame.height) != first:
                raise BadImage(f"the clip changes resolution mid-stream ({first[0]}x{first[1]} -> "
                               f"{frame.width}x{frame.height})")
            rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)[None]
            resized = VideoPreprocessor.resize(rgb, size)[0]
            for position in wanted[number]:
                out[position] = resized
    except av.FFmpegError as exc:
        raise BadImage(f"corrupt video: {_reason(exc)}") from None
    finally:
        container.close()
    decoded = sum(f is not None for f in out)
    if decoded < len(out):
        raise BadImage(f"corrupt or truncated video: {decoded} of the {len(out)} sampled frames decoded "
                       f"({total} frames in its packets)")
    return Clip(torch.stack(out), tuple(indices), total, fps, first[0], first[1])


def check_tokens(pre: VideoPreprocessor, frames: int, size: tuple[int, int], limits: VideoLimits) -> int:
    """The prompt tokens of `frames` frames resized to `size`, refused over `limits.max_tokens`."""
    tokens = pre.tokens(frames, size)
    if tokens > limits.max_tokens:
        raise TooLarge(f"the clip is {tokens} tokens ({frames} frames); the limit is {limits.max_tokens} "
                       f"({limits.tokens_setting}; lower fps or max_pixels)")
    return tokens


def _check_frame_size(width: int, height: int, limits: VideoLimits) -> None:
    if width * height > limits.max_frame_pixels:
        raise TooLarge(f"video frames are {width}x{height} = {width * height} pixels; the limit is "
                       f"{limits.max_frame_pixels} (VLSPLIT_MAX_VIDEO_FRAME_PIXELS)")


def _check_deadline(deadline: float, limits: VideoLimits) -> None:
    if time.monotonic() > deadline:
        raise TooLarge(f"decoding the clip took over {limits.decode_timeout_s:g} s (VLSPLIT_VIDEO_DECODE_TIMEOUT_S)")
