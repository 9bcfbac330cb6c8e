"""Opt-in (`make test-slow`): the equivalence oracle at the real widths and real Qwen vocabulary.

Builds each family's `bench` checkpoint (about 1 GB each, ~30 s) once under .cache/models/.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import FAMILIES, make_image
from reference import reference_tokens
from test_equivalence import QUESTION, split_tokens
from services.model_builder import make_model
from shared.images import load_image

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "models"


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_split_equals_monolithic_at_real_widths(family):
    path = CACHE / f"bench-{family}"
    if not (path / "config.json").is_file():
        make_model(path, family, "bench", seed=0)
    images = [load_image(make_image(448, 336, seed=1))]
    ours, _ = split_tokens(str(path), images, max_new_tokens=8)
    assert ours == reference_tokens(str(path), images, QUESTION, max_new_tokens=8)


@pytest.mark.slow
def test_batched_questions_equal_monolithic_at_real_widths():
    """Four questions decoded as one batch (the decoder's small-batch matmul path, 151,936-row head)
    give each question's monolithic greedy answer."""
    from test_equivalence import engines
    from services.llm_decoder.engine import GenerationInput
    from shared.sampling import SamplingParams
    from shared.schema import question_messages

    path = CACHE / "bench-qwen2_vl"
    if not (path / "config.json").is_file():
        make_model(path, "qwen2_vl", "bench", seed=0)
    images = [load_image(make_image(448, 336, seed=2))]
    questions = [QUESTION, "What colours dominate?", "Is there any text in the image?", "Summarise the picture."]
    encoder, decoder = engines(str(path))
    payloads = encoder.encode(images)
    requests = [GenerationInput(question_messages(q, 1), payloads, SamplingParams(max_new_tokens=16))
                for q in questions]
    answers: dict[int, list[int]] = {}
    for row, event in decoder.generate_batch(requests):
        if event.token_id is not None:
            answers.setdefault(row, []).append(event.token_id)
    for row, question in enumerate(questions):
        assert answers[row] == reference_tokens(str(path), images, question, max_new_tokens=16), question
