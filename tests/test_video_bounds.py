"""Every video bound at its limit and one past it, and hostile clips, against shared/video.py directly and
through a real encoder process over gRPC.

Each refusal names its setting (VLSPLIT_MAX_VIDEO_*); a bad clip (corrupt, truncated, zero or one frame,
audio only, a resolution over the limit) is INVALID_ARGUMENT (`BadImage` and `TooLarge` both map there,
shared/errors.py), and the encoder goes on serving: health stays SERVING, nothing is answered INTERNAL, the
next clip encodes. A hypothesis fuzz of the container decoder checks that mutated clips only ever give
valid `VideoInputs` or our typed errors.
"""

from __future__ import annotations

import io
import math
import time
from functools import lru_cache

import av
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clips import FORMATS, _sine, make_audio_only, make_clip
from procs import Service, running
from shared.errors import BadImage, TooLarge
from shared.families import get_family
from shared.video import VideoInputs, VideoLimits, VideoPreprocessor, probe, read_clip
from vlsplit.v1 import common_pb2, vision_encoder_pb2 as pb, vision_encoder_pb2_grpc

FAMILIES = ["qwen2_vl", "qwen3_vl"]
SERVING = health_pb2.HealthCheckResponse.SERVING
ENCODES = "vlsplit_encoder_encodes_total"



# --- clips ---------------------------------------------------------------------------------------


@lru_cache
def clip(seconds: float = 2.0, width: int = 64, height: int = 48, fps: int = 8, fmt: str = "mp4",
         seed: int = 0) -> bytes:
    return make_clip(seconds, width, height, fps, fmt, seed)


@lru_cache
def solid_clip(width: int, height: int, frames: int = 1) -> bytes:
    """Black h264 frames: a few tens of KB even at 4000x4000 (the header is what says the resolution)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        black = np.zeros((height, width, 3), np.uint8)
        for _ in range(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(black, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


@lru_cache
def frameless_clip() -> bytes:
    """A matroska file with a video stream that holds no packet (only its audio track has any)."""
    container_format, codec, pix_fmt = FORMATS["mkv"]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
        stream.options = {"preset": "ultrafast"}
        _sine(container, container.add_stream("aac", rate=16000), 0.5)
        container.mux(stream.encode())
    return buf.getvalue()


@lru_cache
def no_decoder_clip() -> bytes:
    """An mp4 whose video sample entry names a codec FFmpeg does not know (`avc1` -> `xxxx`)."""
    data = clip(1.0, 32, 32, 4)
    assert data.count(b"avc1") >= 1
    return data.replace(b"avc1", b"xxxx")


def _flip(data: bytes, positions) -> bytes:
    out = bytearray(data)
    for p in positions:
        out[p] ^= 0xFF
    return bytes(out)


def _flip_tag(data: bytes, tag: bytes) -> bytes:
    at = data.index(tag)
    return _flip(data, range(at, at + len(tag)))


def _mdat_flips(data: bytes) -> bytes:
    """Every 64th byte of the mp4's frame data (between `mdat` and `moov`) inverted: its boxes stay intact."""
    return _flip(data, range(data.index(b"mdat") + 8, data.index(b"moov"), 64))


# name -> (bytes, a phrase the refusal holds). The mp4 is moov-last (what PyAV writes), so any cut loses it.
# PROBED: the cases PutImage refuses too (it probes a clip's container and packets, never decodes a frame).
HOSTILE = {
    "random_bytes": (lambda: np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
                     "not a readable video"),
    "text": (lambda: b"this is plain text, not a clip" * 20, "not a readable video"),
    "mp4_flipped_frame_data": (lambda: _mdat_flips(clip()), "corrupt video"),
    "mp4_flipped_moov": (lambda: _flip_tag(clip(), b"moov"), "not a readable video"),
    "mp4_flipped_sample_sizes": (lambda: _flip_tag(clip(), b"stsz"), "holds no frames"),
    "mp4_flipped_every_16th_byte": (lambda: _flip(clip(), range(0, len(clip()), 16)), "not a readable video"),
    "webm_flipped_frame_data": (lambda: _flip(clip(fmt="webm"), range(400, len(clip(fmt="webm")), 64)),
                                "corrupt video"),
    "webm_flipped_ebml_magic": (lambda: _flip(clip(fmt="webm"), range(4)), "unsupported video container"),
    "webm_cut_to_a_quarter": (lambda: clip(fmt="webm")[:len(clip(fmt="webm")) // 4], "holds no frames"),
    "mp4_cut_in_half": (lambda: clip()[:len(clip()) // 2], "not a readable video"),
    "mp4_last_kib_cut": (lambda: clip()[:-1024], "not a readable video"),
    "mp4_cut_to_100_bytes": (lambda: clip()[:100], "not a readable video"),
    "zero_frames": (frameless_clip, "holds no frames"),
    "one_frame": (lambda: clip(seconds=1 / 8), "1 frame(s); at least 2 are needed"),
    "audio_only": (lambda: make_audio_only(1.0), "no video stream (audio only)"),
    "empty": (lambda: b"", "empty video"),
}
DECODED_ONLY = {"mp4_flipped_frame_data", "webm_flipped_frame_data", "one_frame"}
PROBED = [case for case in HOSTILE if case not in DECODED_ONLY]


def preprocessor(family: str) -> VideoPreprocessor:
    """The family's published video processing (what make-model writes into video_preprocessor_config.json)."""
    return VideoPreprocessor(get_family(family).video, {})


def small(pre: VideoPreprocessor, limits: VideoLimits, **kw):
    """A sampling whose frames resize to a few merged patches (fast, few tokens)."""
    f2 = pre.factor * pre.factor
    return pre.sampling(limits, min_pixels=f2, max_pixels=4 * f2 if pre.rule == "qwen2" else 64 * f2, **kw)


def refused(kind, setting: str, call):
    with pytest.raises(kind) as info:
        call()
    assert setting in str(info.value), str(info.value)
    return info.value


def valid(inputs: VideoInputs) -> VideoInputs:
    t, h, w = inputs.grid_thw
    assert inputs.pixel_values.shape[0] == t * h * w > 0 and torch_finite(inputs.pixel_values)
    assert len(inputs.video.timestamps) == t
    return inputs


def torch_finite(x) -> bool:
    return bool(x.isfinite().all())


# --- shared/video.py directly ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_bytes_at_and_past_the_limit(family):
    pre, data = preprocessor(family), clip(seed=1)
    limits = VideoLimits(max_bytes=len(data))
    valid(pre.preprocess(data, small(pre, limits), limits))
    past = VideoLimits(max_bytes=len(data) - 1)
    refused(TooLarge, "VLSPLIT_MAX_VIDEO_BYTES", lambda: pre.preprocess(data, small(pre, past), past))


@pytest.mark.parametrize("family", FAMILIES)
def test_seconds_at_and_past_the_limit(family):
    pre, limits = preprocessor(family), VideoLimits(max_duration_s=4.0)
    at, over = clip(seconds=4.0, width=32, height=32), clip(seconds=4.125, width=32, height=32)  # 32 and 33 frames
    assert probe(at, limits)[:2] == (32, 8.0)
    valid(pre.preprocess(at, small(pre, limits), limits))
    refused(TooLarge, "VLSPLIT_MAX_VIDEO_SECONDS", lambda: probe(over, limits))
    refused(TooLarge, "VLSPLIT_MAX_VIDEO_SECONDS", lambda: pre.preprocess(over, small(pre, limits), limits))


@pytest.mark.parametrize("family", FAMILIES)
def test_source_frames_at_and_past_the_limit(family):
    pre, data = preprocessor(family), clip()  # 16 frames
    limits = VideoLimits(max_source_frames=16)
    valid(pre.preprocess(data, small(pre, limits), limits))
    past = VideoLimits(max_source_frames=15)
    refused(TooLarge, "VLSPLIT_MAX_VIDEO_SOURCE_FRAMES", lambda: pre.preprocess(data, small(pre, past), past))


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_frames_at_and_past_the_limit(family):
    """A request's max_frames: the limit itself samples that many; one more is refused. Without one, the
    sampling is capped at the limit (not refused); read_clip checks the count again against its limits."""
    pre, data = preprocessor(family), clip()  # 16 frames at 8 fps: fps 8 samples all of them
    limits = VideoLimits(max_frames=8)
    at = pre.sampling(limits, fps=8, max_frames=8, min_pixels=pre.factor ** 2, max_pixels=64 * pre.factor ** 2)
    assert len(read_clip(data, pre, at, limits).indices) == 8
    refused(TooLarge, "VLSPLIT_MAX_VIDEO_FRAMES", lambda: pre.sampling(limits, fps=8, max_frames=9))
    capped = pre.sampling(limits, fps=8, min_pixels=pre.factor ** 2, max_pixels=64 * pre.factor ** 2)
    assert capped.max_frames == 8 and len(read_clip(data, pre, capped, limits).indices) == 8
    wide = pre.sampling(VideoLimits(), fps=8, min_pixels=pre.factor ** 2, max_pixels=64 * pre.factor ** 2)
    assert len(read_clip(data, pre, wide, VideoLimits(max_frames=16)).indices) == 16
    refused(TooLarge, "VLSPLIT_MAX_VIDEO_FRAMES", lambda: read_clip(data, pre, wide, VideoLimits(max_frames=15)))


@pytest.mark.parametrize("family", FAMILIES)
def test_frame_pixels_at_and_past_the_limit(family):
    pre, data = preprocessor(family), clip()  # 64 x 48
    limits = VideoLimits(max_frame_pixels=64 * 48)
    valid(pre.preprocess(data, small(pre, limits), limits))
    past = VideoLimits(max_frame_pixels=64 * 48 - 1)
    refused(TooLarge, "VLSPLIT_MAX_VIDEO_FRAME_PIXELS", lambda: pre.preprocess(data, small(pre, past), past))


@pytest.mark.parametrize("family", FAMILIES)
def test_huge_resolution_is_refused_from_its_header(family):
    """4000x4000 (16 MP, over the 3840x2160 default) in a few KB: refused from the stream's header, before a frame is
    decoded."""
    pre, data = preprocessor(family), solid_clip(4000, 4000)
    assert len(data) < 100_000
    refused(TooLarge, "VLSPLIT_MAX_VIDEO_FRAME_PIXELS", lambda: probe(data, VideoLimits()))
    refused(TooLarge, "VLSPLIT_MAX_VIDEO_FRAME_PIXELS", lambda: pre.preprocess(data, pre.sampling(VideoLimits())))


@pytest.mark.parametrize("family", FAMILIES)
def test_tokens_at_and_past_the_limit(family):
    pre, data = preprocessor(family), clip()
    s = pre.sampling(VideoLimits())  # the checkpoint's default sampling
    tokens = math.prod(pre.preprocess(data, s).grid_thw) // pre.merge_size ** 2
    at = VideoLimits(max_tokens=tokens)
    assert math.prod(valid(pre.preprocess(data, s, at)).grid_thw) // pre.merge_size ** 2 == tokens
    past = VideoLimits(max_tokens=tokens - 1)
    error = refused(TooLarge, "VLSPLIT_MAX_VIDEO_TOKENS", lambda: pre.preprocess(data, s, past))
    assert f"{tokens} tokens" in str(error)


@pytest.mark.parametrize("family", FAMILIES)
def test_fps_at_and_past_the_limit(family):
    pre, limits = preprocessor(family), VideoLimits(max_fps=4.0)
    at = small(pre, limits, fps=4.0)
    assert at.fps == 4.0 and len(read_clip(clip(), pre, at, limits).indices) == 8  # 2 s at 4 fps
    for over in (math.nextafter(4.0, math.inf), 4.5, float("inf"), float("nan"), -1.0):
        refused(TooLarge, "VLSPLIT_MAX_VIDEO_FPS", lambda: pre.sampling(limits, fps=over))


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_timeout(family):
    """A tiny timeout (1 us: past by the first check, however fast the machine) on a longer clip (40 s, 320
    frames) is refused at once, by the packet count (every 256 packets) or the first decoded frame; the same
    clip decodes under a generous one."""
    pre, data = preprocessor(family), clip(seconds=40, width=32, height=32)
    tiny = VideoLimits(decode_timeout_s=1e-6)
    refused(TooLarge, "VLSPLIT_VIDEO_DECODE_TIMEOUT_S", lambda: probe(data, tiny))  # 320 packets: checked at 256
    start = time.monotonic()
    refused(TooLarge, "VLSPLIT_VIDEO_DECODE_TIMEOUT_S", lambda: pre.preprocess(data, small(pre, tiny, fps=0.5), tiny))
    assert time.monotonic() - start < 2.0
    roomy = VideoLimits(decode_timeout_s=60)
    assert len(read_clip(data, pre, small(pre, roomy, fps=0.5), roomy).indices) == 20


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_clip_is_bad_image(family, case):
    make, phrase = HOSTILE[case]
    pre = preprocessor(family)
    with pytest.raises(BadImage) as info:
        pre.preprocess(make(), pre.sampling(VideoLimits()))
    assert phrase in str(info.value), str(info.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_webm_cut_in_half_plays_as_the_shorter_clip_it_still_is(family):
    """Matroska holds its frames in order with no index needed, so half a webm is a valid, shorter clip: its
    frames are counted from the packets that are there (never from the header's duration)."""
    pre, whole = preprocessor(family), clip(fmt="webm")
    half = whole[:len(whole) // 2]
    frames = probe(half, VideoLimits())[0]
    assert 2 <= frames < probe(whole, VideoLimits())[0]
    s = small(pre, VideoLimits())
    assert read_clip(half, pre, s).total_frames == frames
    shorter, full = valid(pre.preprocess(half, s)), valid(pre.preprocess(whole, s))
    assert shorter.video.timestamps[-1] < full.video.timestamps[-1]


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_without_a_decoder_is_bad_image(family):
    """A video stream FFmpeg has no decoder for (mp4's `avc1` sample entry renamed): no codec context."""
    pre = preprocessor(family)
    with pytest.raises(BadImage):
        pre.preprocess(no_decoder_clip(), pre.sampling(VideoLimits()))
    with pytest.raises(BadImage, match="no decoder for the clip's video codec"):
        probe(no_decoder_clip(), VideoLimits())


# --- fuzz: mutated clips ---------------------------------------------------------------------------

FUZZ_LIMITS = VideoLimits(max_bytes=1 << 20, decode_timeout_s=5.0)
FUZZ_BASES = {fmt: make_clip(1.0, 32, 32, 4, fmt) for fmt in ("mp4", "webm")}  # 4 frames each
MUTATION = st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]), st.floats(0, 1, exclude_max=True),
                     st.integers(1, 255), st.integers(1, 16))


def _mutate(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    for kind, where, value, length in mutations:
        at = int(where * len(out)) if out else 0
        if kind == "flip" and out:
            out[at] ^= value
        elif kind == "insert":
            out[at:at] = bytes([value]) * length
        elif kind == "delete":
            del out[at:at + length]
        elif kind == "truncate":
            del out[at:]
    return bytes(out)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", list(FUZZ_BASES))
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(mutations=st.lists(MUTATION, min_size=1, max_size=6))
def test_mutated_clip_is_valid_or_refused(fmt, mutations):
    data = _mutate(FUZZ_BASES[fmt], mutations)
    pre = preprocessor("qwen2_vl")
    start = time.monotonic()
    try:
        valid(pre.preprocess(data, small(pre, FUZZ_LIMITS), FUZZ_LIMITS))
    except (BadImage, TooLarge):
        pass
    assert time.monotonic() - start < 2 * FUZZ_LIMITS.decode_timeout_s + 5


# --- through a real encoder process -----------------------------------------------------------------

# The main encoder's limits, each small enough that a few-KB clip reaches it. The clips that must pass are
# all under BYTES_LIMIT (the largest of them is exactly at it).
SECONDS_LIMIT, FRAMES_LIMIT, FPS_LIMIT, PIXELS_LIMIT = 4.0, 8, 4.0, 64 * 48
TIMEOUT_S = 1e-6  # the second encoder's decode timeout: past by the first check, whatever the machine


def at_bytes_clip() -> bytes:
    return clip(seconds=SECONDS_LIMIT, seed=2)  # 4 s, 64x48: also exactly at the seconds limit


def tokens_clip() -> bytes:
    return clip(seed=3)


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


class Encoder:
    def __init__(self, service: Service):
        self.service = service
        self.stub = vision_encoder_pb2_grpc.VisionEncoderStub(grpc.insecure_channel(service.address))

    def encode(self, data: bytes, max_tokens: int = 0, **video) -> common_pb2.EmbeddingInfo:
        replies = list(self.stub.Encode(pb.EncodeRequest(image=data, video=common_pb2.VideoParams(**video),
                                                         max_tokens=max_tokens), timeout=120))
        assert replies[0].WhichOneof("part") == "info"
        return replies[0].info

    def put(self, data: bytes) -> pb.PutImageResponse:
        return self.stub.PutImage(pb.PutImageRequest(image=data, video=True), timeout=60)

    def internal(self) -> float:
        return self.service.metric("vlsplit_requests_total", code="INTERNAL")

    def refused(self, setting_or_phrase: str, call) -> grpc.RpcError:
        """`call` fails INVALID_ARGUMENT naming `setting_or_phrase`, and the encoder goes on serving."""
        internal = self.internal()
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
        assert setting_or_phrase in error.details(), error.details()
        assert self.service.health() == SERVING
        assert self.internal() == internal, self.service.tail()
        return error


@pytest.fixture(scope="module")
def tiny_qwen2(tiny_models) -> str:
    return tiny_models["qwen2_vl"]


@pytest.fixture(scope="module")
def pre2(tiny_qwen2) -> VideoPreprocessor:
    return VideoPreprocessor.from_pretrained(tiny_qwen2, "qwen2_vl")


@pytest.fixture(scope="module")
def tokens_limit(pre2) -> int:
    """tokens_clip's tokens at the checkpoint's default sampling: the main encoder's VLSPLIT_MAX_VIDEO_TOKENS."""
    return math.prod(pre2.preprocess(tokens_clip(), pre2.sampling(VideoLimits())).grid_thw) // pre2.merge_size ** 2


@pytest.fixture(scope="module")
def encoders(tiny_qwen2, tokens_limit, tmp_path_factory):
    """The main encoder (every limit small) and one with a short decode timeout, started side by side."""
    logs = tmp_path_factory.mktemp("logs")
    main = Service("encoder", "--model", tiny_qwen2, "--redis", "memory", log_dir=logs, env={
        "VLSPLIT_MAX_VIDEO_BYTES": str(len(at_bytes_clip())), "VLSPLIT_MAX_VIDEO_SECONDS": str(SECONDS_LIMIT),
        "VLSPLIT_MAX_VIDEO_FRAMES": str(FRAMES_LIMIT), "VLSPLIT_MAX_VIDEO_FRAME_PIXELS": str(PIXELS_LIMIT),
        "VLSPLIT_MAX_VIDEO_TOKENS": str(tokens_limit), "VLSPLIT_MAX_VIDEO_FPS": str(FPS_LIMIT)})
    slow = Service("encoder", "--model", tiny_qwen2, "--redis", "memory", log_dir=logs,
                   env={"VLSPLIT_VIDEO_DECODE_TIMEOUT_S": str(TIMEOUT_S)})
    with running(main, slow):
        yield Encoder(main), Encoder(slow)


@pytest.fixture(scope="module")
def encoder(encoders) -> Encoder:
    return encoders[0]


SMALL = {"min_pixels": 28 * 28, "max_pixels": 4 * 28 * 28}  # a few tokens a frame (qwen2: factor 28)


def test_service_bytes(encoder):
    data = at_bytes_clip()
    assert encoder.encode(data, **SMALL).n_tokens > 0
    assert encoder.put(data).frames == 32
    over = data + b"\0"
    encoder.refused("VLSPLIT_MAX_VIDEO_BYTES", lambda: encoder.encode(over, **SMALL))
    encoder.refused("VLSPLIT_MAX_VIDEO_BYTES", lambda: encoder.put(over))


def test_service_seconds(encoder):
    at, over = clip(seconds=4.0, width=32, height=32, seed=4), clip(seconds=4.125, width=32, height=32, seed=4)
    put = encoder.put(at)
    assert (put.frames, put.duration_s) == (32, 4.0)
    assert encoder.encode(at, **SMALL).n_tokens > 0
    encoder.refused("VLSPLIT_MAX_VIDEO_SECONDS", lambda: encoder.encode(over, **SMALL))
    encoder.refused("VLSPLIT_MAX_VIDEO_SECONDS", lambda: encoder.put(over))


def test_service_sampled_frames(encoder):
    data = clip(seed=5)  # 16 frames at 8 fps; fps 4 samples 8 = the limit
    info = encoder.encode(data, fps=FPS_LIMIT, max_frames=FRAMES_LIMIT, **SMALL)
    assert info.grid_thw[0] == FRAMES_LIMIT // 2
    encoder.refused("VLSPLIT_MAX_VIDEO_FRAMES", lambda: encoder.encode(data, max_frames=FRAMES_LIMIT + 1, **SMALL))


def test_service_frame_pixels(encoder):
    encoder.encode(clip(seed=6), **SMALL)  # 64 x 48: the limit
    over = clip(width=66, height=48, seed=6)  # the next size h264's 4:2:0 allows
    encoder.refused("VLSPLIT_MAX_VIDEO_FRAME_PIXELS", lambda: encoder.encode(over, **SMALL))
    encoder.refused("VLSPLIT_MAX_VIDEO_FRAME_PIXELS", lambda: encoder.put(over))


def test_service_huge_resolution(encoder):
    data = solid_clip(4000, 4000)
    assert len(data) <= len(at_bytes_clip())  # refused for its pixels, not its bytes
    encoder.refused("VLSPLIT_MAX_VIDEO_FRAME_PIXELS", lambda: encoder.encode(data, **SMALL))
    encoder.refused("VLSPLIT_MAX_VIDEO_FRAME_PIXELS", lambda: encoder.put(data))


def test_service_tokens(encoder, tokens_limit):
    data = tokens_clip()
    assert encoder.encode(data).n_tokens == tokens_limit  # the default sampling: exactly the limit
    encoder.refused("VLSPLIT_MAX_VIDEO_TOKENS", lambda: encoder.encode(data, fps=FPS_LIMIT))  # 8 frames: twice


def test_service_fps(encoder):
    data = clip(seed=7)
    assert encoder.encode(data, fps=FPS_LIMIT, **SMALL).grid_thw[0] == 4  # 8 frames
    for over in (math.nextafter(FPS_LIMIT, math.inf), FPS_LIMIT + 0.5):
        encoder.refused("VLSPLIT_MAX_VIDEO_FPS", lambda: encoder.encode(data, fps=over, **SMALL))
    encoder.refused("fps must be a finite number", lambda: encoder.encode(data, fps=float("nan")))


def test_service_max_tokens_refused_before_the_tower(encoder, pre2):
    data = clip(seed=8)
    tokens = math.prod(pre2.preprocess(data, pre2.sampling(VideoLimits())).grid_thw) // pre2.merge_size ** 2
    encodes = encoder.service.metric(ENCODES)
    error = encoder.refused("VLSPLIT_MAX_MODEL_LEN", lambda: encoder.encode(data, max_tokens=tokens - 1))
    assert f"the clip is {tokens} tokens" in error.details() and f"the limit is {tokens - 1}" in error.details()
    assert encoder.service.metric(ENCODES) == encodes  # refused before the tower ran
    assert encoder.encode(data, max_tokens=tokens).n_tokens == tokens
    assert encoder.service.metric(ENCODES) == encodes + 1


def test_service_max_tokens_holds_for_a_cached_clip(encoder, pre2):
    data = clip(seed=9)
    tokens = encoder.encode(data).n_tokens  # now cached
    encoder.refused("VLSPLIT_MAX_MODEL_LEN", lambda: encoder.encode(data, max_tokens=tokens - 1))


def test_service_decode_timeout(encoders):
    """A tiny timeout on a longer clip: Encode and PutImage (its probe checks the time every 256 packets) refuse
    it at once; a clip of fewer packets still uploads, and health stays SERVING. (A clip decoding within a
    timeout is test_decode_timeout's: no wall-clock bound between the two is safe on every machine.)"""
    _, slow = encoders
    longer = clip(seconds=40, width=32, height=32, seed=10)  # 320 frames
    start = time.monotonic()
    slow.refused("VLSPLIT_VIDEO_DECODE_TIMEOUT_S", lambda: slow.encode(longer, **SMALL))
    slow.refused("VLSPLIT_VIDEO_DECODE_TIMEOUT_S", lambda: slow.put(longer))
    assert time.monotonic() - start < 10
    assert slow.put(clip(seed=10)).frames == 16  # 16 packets: the probe never looks at the clock


@pytest.mark.parametrize("case", list(HOSTILE))
def test_service_hostile_clip(encoder, case):
    make, phrase = HOSTILE[case]
    data = make()
    assert len(data) <= len(at_bytes_clip())
    encoder.refused(phrase, lambda: encoder.encode(data))


@pytest.mark.parametrize("case", PROBED)
def test_service_hostile_upload(encoder, case):
    make, phrase = HOSTILE[case]
    encoder.refused(phrase, lambda: encoder.put(make()))


def test_service_stream_without_a_decoder(encoder):
    internal = encoder.internal()
    error = rpc_error(lambda: encoder.encode(no_decoder_clip()))
    assert encoder.service.health() == SERVING  # the server survives even now (the interceptor answers INTERNAL)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and encoder.internal() == internal, \
        (error.code(), error.details())


def test_service_still_encodes_after_all_that(encoder):
    """Run last in this module: after every refusal above, a fresh clip encodes and health is SERVING."""
    info = encoder.encode(clip(seed=11), **SMALL)
    assert info.n_tokens > 0 and info.video
    assert encoder.service.health() == SERVING
