"""Fixtures of the video reference check (`make test-video-reference`), self-contained: this folder is not
part of `make test` (tests/conftest.py ignores it) and runs in .cache/video-reference/venv, where the official
transformers video processors import (torchvision beside a torch it supports). Its own pytest.ini makes it
its own rootdir, so tests/conftest.py (which needs .venv's packages) is never loaded here.

Checkpoints: the three tiny random-weight families, built once per session with .venv's `make_model` (the
project's `vlsplit` package imports grpc, which the reference venv does not have). Clips: made with PyAV,
a moving pattern so every frame differs, in the containers and codecs the service accepts."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:
    import torchvision  # noqa: F401  (the official video processors need it)
except Exception as exc:  # pragma: no cover - only outside the reference venv
    raise pytest.UsageError(
        f"tests/video_reference needs torchvision ({type(exc).__name__}: {exc}); run `make test-video-reference`, "
        "which builds .cache/video-reference/venv and runs these tests there") from None

import av
import numpy as np

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
PROJECT_PYTHON = os.environ.get("VIDEO_REF_PROJECT_PYTHON", str(ROOT / ".venv" / "bin" / "python"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """family -> a tiny checkpoint directory (the code path of `vlsplit make-model DIR --family F --size tiny`)."""
    root = tmp_path_factory.mktemp("models")
    paths = {family: root / family for family in FAMILIES}
    script = ("import sys\nfrom services.model_builder import make_model\n"
              "for family, path in zip(sys.argv[1::2], sys.argv[2::2]):\n"
              "    make_model(path, family, 'tiny', seed=0)\n")
    args = [str(v) for family, path in paths.items() for v in (family, path)]
    try:
        import services.model_builder  # noqa: F401  (imports here only where grpc is installed too)

        python = sys.executable
    except ImportError:
        python = PROJECT_PYTHON
        if not Path(python).exists():
            pytest.fail(f"{python} is missing: run `make setup` (tiny checkpoints are built with .venv's make_model)")
    subprocess.run([python, "-c", script, *args], cwd=ROOT, check=True)
    return {family: str(path) for family, path in paths.items()}


# -- clips --

@dataclass(frozen=True)
class ClipSpec:
    container: str  # PyAV format name
    codec: str
    width: int
    height: int
    fps: Fraction
    seconds: float
    pix_fmt: str = "yuv420p"

    @property
    def id(self) -> str:
        rate = f"{float(self.fps):g}"
        return f"{self.container}-{self.codec}-{self.width}x{self.height}-{rate}fps-{self.seconds:g}s"

    @property
    def frames(self) -> int:
        return round(self.seconds * self.fps)


# Short and long, square and odd-sized (odd widths: h264 needs 4:4:4 for them, vp9 takes 4:2:0), 24 / 30 /
# 29.97 frames a second, mp4/h264 and webm/vp9.
CLIPS = [
    ClipSpec("mp4", "libx264", 448, 448, Fraction(30), 3),
    ClipSpec("webm", "libvpx-vp9", 448, 448, Fraction(30), 3),
    ClipSpec("mp4", "libx264", 333, 250, Fraction(24), 16, pix_fmt="yuv444p"),
    ClipSpec("webm", "libvpx-vp9", 333, 250, Fraction(24), 16),
    ClipSpec("mp4", "libx264", 320, 240, Fraction(30000, 1001), 5),
]


def pattern_frames(width: int, height: int, n: int, seed: int = 0):
    """A moving, textured pattern (gradients that scroll, a checkerboard, a square that moves): every frame
    differs, with sharp edges for the resize to get right."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    texture = rng.integers(0, 24, size=(height // 8 + 1, width // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)
    texture = texture[:height, :width]
    for i in range(n):
        r = (x * 2 + 3 * i) % 256
        g = (y * 2 + 5 * i) % 256
        b = ((x // 16 + y // 16 + i // 4) % 2) * 180
        frame = np.stack([r, g, b], -1) + texture
        side = max(8, min(width, height) // 6)
        cx, cy = (i * 7) % max(width - side, 1), (i * 5) % max(height - side, 1)
        frame[cy:cy + side, cx:cx + side] = (255, 255, 32)
        yield (frame % 256).astype(np.uint8)


def encode(spec: ClipSpec) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=spec.container) as container:
        stream = container.add_stream(spec.codec, rate=spec.fps)
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, spec.pix_fmt
        if spec.codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "20"}
        elif spec.codec == "libvpx-vp9":
            stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "30", "b": "0"}
        for array in pattern_frames(spec.width, spec.height, spec.frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


@dataclass(frozen=True)
class Decoded:
    """What the official processors are fed: every frame PyAV decodes, and the stream's metadata."""

    frames: np.ndarray  # [N, H, W, 3] uint8
    fps: float  # the stream's average_rate
    duration: float

    @property
    def total(self) -> int:
        return int(self.frames.shape[0])


def decode_all(data: bytes) -> Decoded:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
        duration = container.duration / av.time_base if container.duration else frames.shape[0] / fps
    return Decoded(frames, fps, duration)


_CLIPS: dict[str, tuple[bytes, Decoded]] = {}


def clip(spec: ClipSpec) -> tuple[bytes, Decoded]:
    """(encoded bytes, all frames decoded), made once per session."""
    if spec.id not in _CLIPS:
        data = encode(spec)
        _CLIPS[spec.id] = (data, decode_all(data))
    return _CLIPS[spec.id]


def pytest_terminal_summary(terminalreporter):
    """The largest pixel difference per family, for the record (ideally 0 everywhere)."""
    module = sys.modules.get("test_video_reference")
    lines = module.summary_lines() if module is not None else []
    if lines:
        terminalreporter.section("video reference: largest pixel differences")
        for line in lines:
            terminalreporter.write_line(line)
