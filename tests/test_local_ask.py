"""`vlsplit local-ask`: encoder + decoder in one process, image encoded once for all questions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from reference import reference_tokens
from services.local import LocalPipeline
from shared.sampling import SamplingParams
from shared.image_ids import image_id
from shared.images import load_image

SAMPLE = Path(__file__).resolve().parent.parent / "docs" / "sample.png"
QUESTIONS = ["What is in this picture?", "What colour is the roof?", "Is it day or night?"]
FIELDS = {"question", "text", "token_ids", "image_id", "encode_ms", "ttft_ms", "total_ms"}


def test_image_is_encoded_once_for_all_questions(tiny_models):
    pipeline = LocalPipeline(tiny_models["qwen2_vl"])
    calls = []
    encode = pipeline.encoder.encode
    pipeline.encoder.encode = lambda images: calls.append(len(images)) or encode(images)
    answers = list(pipeline.ask(SAMPLE.read_bytes(), QUESTIONS, SamplingParams(max_new_tokens=6)))
    assert calls == [1]
    assert [a.question for a in answers] == QUESTIONS
    assert answers[0].encode_ms > 0 and all(a.encode_ms == 0 for a in answers[1:])


def test_cli_json_lines_match_the_monolithic_model(tiny_models):
    model = tiny_models["qwen3_vl"]
    out = subprocess.run(
        [sys.executable, "-m", "vlsplit.cli", "local-ask", "--model", model, str(SAMPLE), *QUESTIONS[:2],
         "--json", "--max-new-tokens", "10"],
        check=True, capture_output=True, text=True,
    )
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["question"] for line in lines] == QUESTIONS[:2]
    image = load_image(SAMPLE.read_bytes())
    for line in lines:
        assert FIELDS <= set(line)
        assert line["image_id"] == image_id(SAMPLE.read_bytes())
        assert line["token_ids"] == reference_tokens(model, [image], line["question"], max_new_tokens=10)
        assert line["ttft_ms"] <= line["total_ms"]
    assert "RANDOM weights" in out.stderr


def test_cli_reports_bad_image_clearly(tiny_models, tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"hello, I am text")
    out = subprocess.run(
        [sys.executable, "-m", "vlsplit.cli", "local-ask", "--model", tiny_models["qwen2_vl"], str(bad), "hi"],
        capture_output=True, text=True,
    )
    assert out.returncode == 2
    assert "not an image" in out.stderr and "Traceback" not in out.stderr


def test_sample_image_is_bundled():
    assert Image.open(SAMPLE).size == (640, 480)
