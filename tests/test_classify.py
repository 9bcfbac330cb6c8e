"""Classify: label probabilities equal those computed from the monolithic model's own logits."""

from __future__ import annotations

import pytest
import torch

from conftest import make_image
from reference import reference_inputs, reference_model
from engines import engines, image_payload
from services.llm_decoder.engine import GenerationInput
from shared.errors import InvalidRequest, TooLarge
from shared.image_ids import image_id
from shared.images import load_image
from shared.schema import question_messages

QUESTION = "Is this image safe for work? Answer yes or no."
LABELS = ["yes", "no", "maybe not", "it depends on the context"]  # single- and multi-token


@torch.inference_mode()
def reference_logprobs(path: str, image, question: str, labels: list[str]) -> list[float]:
    """Summed label-token logprobs from one monolithic forward over prompt + label."""
    model = reference_model(path)
    inputs = reference_inputs(path, [image], question)
    tokenizer = engines(path)[1].prompts.tokenizer
    out = []
    for label in labels:
        ids = torch.tensor([tokenizer(label, add_special_tokens=False)["input_ids"]])
        full = torch.cat([inputs["input_ids"], ids], dim=1)
        logits = model(input_ids=full, attention_mask=torch.ones_like(full),
                       mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids)], 1),
                       pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]).logits
        logprobs = torch.log_softmax(logits[0, inputs["input_ids"].shape[1] - 1: -1].float(), -1)
        out.append(float(logprobs.gather(1, ids[0][:, None]).sum()))
    return out


def test_probabilities_equal_monolithic_logits(tiny_model):
    encoder, decoder = engines(tiny_model)
    data = make_image(224, 160, seed=41)
    image = load_image(data)
    payload = encoder.encode([image])[0]
    request = GenerationInput(question_messages(QUESTION), [payload], image_ids=(image_id(data),))
    scores = {s.label: s for s in decoder.classify(request, LABELS)}
    expected = reference_logprobs(tiny_model, image, QUESTION, LABELS)
    expected_probs = torch.softmax(torch.tensor(expected, dtype=torch.float64), 0).tolist()
    for label, logprob, prob in zip(LABELS, expected, expected_probs):
        assert scores[label].logprob == pytest.approx(logprob, abs=1e-4)
        assert scores[label].prob == pytest.approx(prob, abs=1e-4)
    ordered = decoder.classify(request, LABELS)
    assert [s.logprob for s in ordered] == sorted((s.logprob for s in ordered), reverse=True)
    assert sum(s.prob for s in ordered) == pytest.approx(1.0)


@pytest.mark.parametrize("labels, error", [([], InvalidRequest), (["a", "a"], InvalidRequest),
                                           (["  "], InvalidRequest), ([str(i) for i in range(65)], TooLarge),
                                           (["word " * 40], TooLarge)])
def test_bad_labels_are_rejected(tiny_models, labels, error):
    encoder, decoder = engines(tiny_models["qwen2_vl"])
    payload = encoder.encode([load_image(make_image(64, 64))])[0]
    with pytest.raises(error):
        decoder.classify(GenerationInput(question_messages(QUESTION), [payload]), labels)


def test_checks_of_one_request_equal_each_check_alone(tiny_models):
    """Moderate: several checks about one image in one request (its prefix computed once)."""
    path = tiny_models["qwen3_vl"]
    _, decoder = engines(path)
    payload, img_id, _ = image_payload(path, seed=43)
    checks = [("Is there violence?", ["yes", "no"]), ("Is there text?", ["yes", "no", "maybe so"]),
              ("What colour dominates?", ["red", "green", "blue", "something else entirely"])]
    together = decoder.classify_many([question_messages(q) for q, _ in checks], [payload],
                                     [labels for _, labels in checks], (img_id,))
    assert [index for index, _ in together] == [0, 1, 2]
    for (_, scores), (question, labels) in zip(together, checks):
        alone = decoder.classify(GenerationInput(question_messages(question), [payload]), labels)
        assert [s.label for s in scores] == [s.label for s in alone]
        assert [s.logprob for s in scores] == pytest.approx([s.logprob for s in alone], abs=1e-4)
