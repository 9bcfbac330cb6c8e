"""Test clips, made by PyAV here (never downloaded): a moving random pattern, so frames differ."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np

# container -> (PyAV format name, codec, pixel format)
FORMATS = {
    "mp4": ("mp4", "libx264", "yuv420p"),
    "webm": ("webm", "libvpx-vp9", "yuv420p"),
    "mov": ("mov", "mpeg4", "yuv420p"),
    "mkv": ("matroska", "libx264", "yuv420p"),
    "avi": ("avi", "mjpeg", "yuvj420p"),
    "gif": ("gif", "gif", "rgb8"),
}


def make_clip(seconds: float = 2.0, width: int = 64, height: int = 48, fps: int = 8, fmt: str = "mp4",
              seed: int = 0, audio: bool = False) -> bytes:
    """`seconds` of video at `fps` in container `fmt` (see FORMATS); with `audio`, a sine track too."""
    container_format, codec, pix_fmt = FORMATS[fmt]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec == "libx264":
            stream.options = {"preset": "ultrafast"}
        sound = container.add_stream("aac", rate=16000) if audio else None
        rng = np.random.default_rng(seed)
        base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        for i in range(round(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(np.roll(base, i * 3, axis=1), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
        if sound is not None:
            _sine(container, sound, seconds)
    return buf.getvalue()


def make_audio_only(seconds: float = 1.0) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        _sine(container, container.add_stream("aac", rate=16000), seconds)
    return buf.getvalue()


def _sine(container, stream, seconds: float) -> None:
    samples = int(seconds * 16000)
    tone = (np.sin(np.arange(samples) * 2 * np.pi * 440 / 16000) * 0.2).astype(np.float32)
    for start in range(0, samples, 1024):
        chunk = tone[start:start + 1024][None]
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 16000, start, Fraction(1, 16000)
        container.mux(stream.encode(frame))
    container.mux(stream.encode())
