"""Session fixtures: tiny checkpoints are built once per test session, offline."""

from __future__ import annotations

import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The equivalence oracle is float32 on both sides: every service a test starts serves float32 unless the
# test says otherwise (the default, `auto`, would pick bfloat16 on CPUs with AMX / AVX-512 BF16).
os.environ["VLSPLIT_DTYPE"] = "float32"
# Decoder servers gather each decode row's context (no kernel compile per test server); the paged kernel has its
# own tests (test_paged_attention.py), servers included.
os.environ.setdefault("VLSPLIT_DECODE_ATTENTION", "gather")

import pytest
from PIL import Image

from services.model_builder import make_model

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]

# tests/video_reference compares shared/video.py with the official video processors, which need torchvision:
# it runs in an environment of its own (`make test-video-reference`), never in `make test`.
collect_ignore = ["video_reference"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {family: str(make_model(root / family, family, "tiny", seed=0)) for family in FAMILIES}


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_model(request, tiny_models) -> str:
    return tiny_models[request.param]


@pytest.fixture(scope="session")
def shared_stacks(tiny_models, tmp_path_factory):
    """family -> its whole stack (Redis, encoder, decoder, gateway with its HTTP API), started on first use
    and shared by every module of the session; tests that break parts of a stack start their own."""
    from stack import Stack

    started: dict = {}

    def get(family: str):
        if family not in started:
            started[family] = Stack(tiny_models[family], tmp_path_factory.mktemp("logs")).start()
        return started[family]

    yield get
    for s in started.values():
        s.stop()


@pytest.fixture(scope="session", params=FAMILIES)
def stack(request, shared_stacks):
    """The shared stack of each family (narrowed with @pytest.mark.parametrize("stack", [...], indirect=True))."""
    return shared_stacks(request.param)


def make_image(width: int, height: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A deterministic, non-uniform test image (gradients plus a seeded pattern), encoded."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    noise = rng.integers(0, 64, size=(height, width, 3))
    pixels = ((base + noise) % 256).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format=fmt)
    return buf.getvalue()


# The default suite (`make test`) runs each behaviour once and stays within its time budget on 2 cores; a test
# whose behaviour a twin already covers there runs with `make test-slow` (pytest -m slow). Each entry names
# its twin.
SLOW_VARIANTS = {
    # the whole-stack equivalence of every family runs by default (test_whole_stack_equals_monolithic_model),
    # and Qwen2.5-VL's chat template is Qwen2-VL's
    "test_chat.py::test_three_turns_with_system_prompt_and_two_images_equal_monolithic_model[qwen2_5_vl]",
}


def family_params(default: str) -> list:
    """FAMILIES as parameters, where only `default` runs in `make test` and the others are opt-in (slow):
    for tests of a family-independent path whose per-family parts other tests cover."""
    return [family if family == default else pytest.param(family, marks=pytest.mark.slow) for family in FAMILIES]


def pytest_collection_modifyitems(items):
    for item in items:
        if item.nodeid.split("tests/", 1)[-1] in SLOW_VARIANTS:
            item.add_marker(pytest.mark.slow)
