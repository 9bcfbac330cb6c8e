"""Decoder engine: streaming, EOS and stop strings, sampling, validation, payload checks,
concurrency, and M-RoPE positions against transformers."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import threading
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from conftest import make_image
from reference import reference_inputs, reference_model, reference_tokens
from services.llm_decoder.engine import DecoderEngine, GenerationInput
from services.llm_decoder.positions import mrope_positions
from services.llm_decoder.sampling import Sampler, SamplingParams
from services.vision_encoder.engine import VisionEngine
from shared.errors import CorruptPayload, InvalidRequest, ModelMismatch, TooLarge
from shared.images import load_image
from shared.schema import question_messages

QUESTION = "What is in this picture?"
STEPS = 12


@lru_cache(maxsize=None)
def engines(path: str) -> tuple[VisionEngine, DecoderEngine]:
    return VisionEngine(path), DecoderEngine(path)


DEFAULT_IMAGE = (200, 150, 0)  # (width, height, seed)


@lru_cache(maxsize=None)
def image(width: int, height: int, seed: int):
    return load_image(make_image(width, height, seed))


@lru_cache(maxsize=None)
def payloads(path: str, *specs: tuple[int, int, int]) -> list:
    """Payloads for images given as (width, height, seed), encoded once per session."""
    return engines(path)[0].encode([image(*spec) for spec in specs]) if specs else []


def request(path, question=QUESTION, images=(DEFAULT_IMAGE,), **sampling) -> GenerationInput:
    sampling.setdefault("max_new_tokens", STEPS)
    return GenerationInput(question_messages(question, len(images)), payloads(path, *images),
                             SamplingParams(**sampling))


def run(path, req: GenerationInput) -> list:
    return list(engines(path)[1].generate(req))


def token_ids(events) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def greedy(path, **kw) -> list[int]:
    return token_ids(run(path, request(path, **kw)))


# ---- streaming -----------------------------------------------------------------------------------


def test_streamed_deltas_concatenate_to_the_decoded_tokens(tiny_model):
    events = run(tiny_model, request(tiny_model, max_new_tokens=16))
    ids = token_ids(events)
    tokenizer = engines(tiny_model)[1].prompts.tokenizer
    assert "".join(e.text for e in events) == tokenizer.decode(ids, skip_special_tokens=True)
    assert [e.finish_reason is not None for e in events] == [False] * (len(events) - 1) + [True]
    assert events[-1].finish_reason == "length"
    assert len(ids) == 16
    assert not set(ids) & engines(tiny_model)[1].eos_ids


# ---- EOS -----------------------------------------------------------------------------------------


def checkpoint_with_eos(src: str, dst: Path, extra_eos: int) -> str:
    """A copy of `src` whose generation_config.json also ends generation at `extra_eos`."""
    shutil.copytree(src, dst)
    config_path = dst / "generation_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token_id"] = [*config["eos_token_id"], extra_eos]
    config_path.write_text(json.dumps(config))
    return str(dst)


def test_eos_stops_generation_like_the_reference(tiny_model, tmp_path):
    full = greedy(tiny_model, max_new_tokens=STEPS)
    # the first step k >= 2 whose token was not emitted before: generation must end exactly there
    k = next(i for i in range(2, len(full)) if full[i] not in full[:i])
    edited = checkpoint_with_eos(tiny_model, tmp_path / "ckpt", full[k])
    assert full[k] in engines(edited)[1].eos_ids

    events = run(edited, request(edited, max_new_tokens=STEPS))
    assert token_ids(events) == full[:k]
    assert events[-1].finish_reason == "stop" and events[-1].token_id is None
    assert sum(e.finish_reason is not None for e in events) == 1
    tokenizer = engines(edited)[1].prompts.tokenizer
    assert "".join(e.text for e in events) == tokenizer.decode(full[:k], skip_special_tokens=True)

    # the monolithic model stops at the same token (reference_tokens strips that final EOS)
    assert reference_tokens(edited, [image(*DEFAULT_IMAGE)], QUESTION, max_new_tokens=STEPS) == full[:k]


# ---- stop strings --------------------------------------------------------------------------------


def stop_string_across_tokens(tokenizer, ids: list[int]) -> tuple[str, int, int]:
    """A printable 4-character substring straddling a token boundary, at its first occurrence.

    Returns (stop, where it starts in the text, how many tokens it takes to complete it).
    """
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for n in range(1, len(ids)):
        boundary = len(tokenizer.decode(ids[:n], skip_special_tokens=True))
        stop = text[boundary - 2: boundary + 2]
        start = boundary - 2
        if (start > 0 and len(stop) == 4 and stop.isascii() and stop.isprintable()
                and text.find(stop) == start):
            needed = next(j for j in range(n, len(ids) + 1)
                          if stop in tokenizer.decode(ids[:j], skip_special_tokens=True))
            return stop, start, needed
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_string_cuts_the_answer_right_before_it(tiny_model):
    tokenizer = engines(tiny_model)[1].prompts.tokenizer
    full = greedy(tiny_model, max_new_tokens=24)
    text = tokenizer.decode(full, skip_special_tokens=True)
    stop, start, needed = stop_string_across_tokens(tokenizer, full)

    events = run(tiny_model, request(tiny_model, max_new_tokens=24, stop=(stop,)))
    streamed = "".join(e.text for e in events)
    assert streamed == text[:start]
    assert events[-1].finish_reason == "stop"
    assert sum(e.finish_reason is not None for e in events) == 1
    assert token_ids(events) == full[:needed]  # generation ends at the token completing the stop
    assert all(stop not in e.text for e in events)


def test_stop_string_never_seen_does_not_stop(tiny_model):
    events = run(tiny_model, request(tiny_model, stop=("\x7f\x7f\x7f never",)))
    assert events[-1].finish_reason == "length"
    assert token_ids(events) == greedy(tiny_model)


# ---- sampling ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_models) -> str:
    return tiny_models["qwen2_vl"]


def test_same_seed_gives_the_same_tokens(tiny_model):
    a = greedy(tiny_model, temperature=1.5, seed=7)
    b = greedy(tiny_model, temperature=1.5, seed=7)
    assert a == b and len(a) == STEPS


def test_different_seeds_give_different_tokens(tiny_model):
    first = greedy(tiny_model, temperature=1.5, seed=0)
    others = [greedy(tiny_model, temperature=1.5, seed=s) for s in (1, 2, 3)]
    assert any(o != first for o in others)


def test_sampling_differs_from_greedy(model):
    assert greedy(model) != greedy(model, temperature=1.5, seed=0)


def test_top_k_one_is_greedy(tiny_model):
    assert greedy(tiny_model, temperature=1.0, top_k=1, seed=3) == greedy(tiny_model)


def test_tiny_top_p_is_greedy(tiny_model):
    assert greedy(tiny_model, temperature=1.0, top_p=1e-6, seed=3) == greedy(tiny_model)


def test_sampling_leaves_the_global_torch_rng_alone(model):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    greedy(model, temperature=1.5, seed=5)
    greedy(model, temperature=1.5)  # unseeded: still its own generator
    assert torch.equal(torch.get_rng_state(), before)
    # and seeding the global RNG does not change a seeded request's tokens
    torch.manual_seed(0)
    a = greedy(model, temperature=1.5, seed=5)
    torch.manual_seed(99)
    assert greedy(model, temperature=1.5, seed=5) == a


def draws(params: SamplingParams, logits: torch.Tensor, n: int = 400) -> set[int]:
    sampler = Sampler(params)
    return {sampler(logits) for _ in range(n)}


def test_sampler_top_k_keeps_only_the_k_best():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9, 2.8, -1.0])
    assert draws(SamplingParams(temperature=5.0, top_k=2, seed=0), logits) == {1, 3}


def test_sampler_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.3, 0.15])
    logits = probs.log()
    assert draws(SamplingParams(temperature=1.0, top_p=0.5, seed=0), logits) == {1}
    assert draws(SamplingParams(temperature=1.0, top_p=0.75, seed=0), logits) == {1, 2}
    assert draws(SamplingParams(temperature=1.0, top_p=1.0, seed=0), logits) == {0, 1, 2, 3}


def test_sampler_greedy_is_argmax():
    logits = torch.tensor([0.1, 0.2, 5.0, 0.3])
    assert draws(SamplingParams(), logits, n=5) == {2}


# ---- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [
    {"max_new_tokens": 0},
    {"max_new_tokens": -3},
    {"temperature": -0.5},
    {"temperature": math.nan},
    {"temperature": math.inf},
    {"top_p": 0.0},
    {"top_p": 1.5},
    {"top_p": math.nan},
    {"top_k": -1},
    {"stop": ("",)},
    {"stop": ("ok", "")},
], ids=repr)
def test_bad_sampling_values_are_invalid_requests(model, sampling):
    with pytest.raises(InvalidRequest) as info:
        run(model, request(model, **{"max_new_tokens": 4, **sampling}))
    assert info.value.grpc_code == "INVALID_ARGUMENT"


def test_max_new_tokens_over_the_limit_is_too_large_and_names_the_limit(model):
    limit = engines(model)[1].max_new_tokens_limit
    with pytest.raises(TooLarge, match=str(limit)):
        run(model, request(model, max_new_tokens=limit + 1))


def test_max_new_tokens_at_the_limit_is_accepted():
    SamplingParams(max_new_tokens=8).validate(8)


# ---- payload checks ------------------------------------------------------------------------------


def generate_with(path, payload_list, n_images=None):
    n = len(payload_list) if n_images is None else n_images
    req = GenerationInput(question_messages(QUESTION, n), payload_list, SamplingParams(max_new_tokens=2))
    return run(path, req)


def one_payload(path):
    return payloads(path, DEFAULT_IMAGE)[0]


def test_payload_of_another_model_is_a_model_mismatch(tiny_model):
    other = dataclasses.replace(one_payload(tiny_model), fingerprint="0" * 32)
    with pytest.raises(ModelMismatch) as info:
        generate_with(tiny_model, [other])
    assert info.value.grpc_code == "FAILED_PRECONDITION"


def test_payload_from_another_family_is_a_model_mismatch(tiny_models):
    theirs = one_payload(tiny_models["qwen2_5_vl"])
    with pytest.raises(ModelMismatch):
        generate_with(tiny_models["qwen2_vl"], [theirs])


def corruptions(payload) -> dict[str, object]:
    emb = payload.embeddings
    cases = {
        "one token short": dataclasses.replace(
            payload, embeddings=emb[:-1], deepstack=tuple(d[:-1] for d in payload.deepstack)),
        "one token extra": dataclasses.replace(
            payload, embeddings=torch.cat([emb, emb[:1]]), deepstack=tuple(torch.cat([d, d[:1]]) for d in payload.deepstack)),
        "hidden too small": dataclasses.replace(
            payload, embeddings=emb[:, :-1], deepstack=tuple(d[:, :-1] for d in payload.deepstack)),
        "3-D embeddings": dataclasses.replace(payload, embeddings=emb[None]),
        "grid of another image": dataclasses.replace(
            payload, grid_thw=(1, payload.grid_thw[1] + 2, payload.grid_thw[2])),
        "grid not divisible by the merge size": dataclasses.replace(  # same t*h*w, so same n_tokens
            payload, grid_thw=(1, 1, payload.grid_thw[1] * payload.grid_thw[2])),
        "empty grid": dataclasses.replace(payload, grid_thw=(0, *payload.grid_thw[1:])),
    }
    if payload.deepstack:
        cases["deepstack level missing"] = dataclasses.replace(payload, deepstack=payload.deepstack[:-1])
        cases["deepstack level extra"] = dataclasses.replace(payload, deepstack=(*payload.deepstack, emb))
        cases["deepstack level short"] = dataclasses.replace(
            payload, deepstack=(payload.deepstack[0][:-1], *payload.deepstack[1:]))
        cases["deepstack level narrow"] = dataclasses.replace(
            payload, deepstack=(*payload.deepstack[:-1], payload.deepstack[-1][:, :-1]))
    else:
        cases["deepstack on a model without it"] = dataclasses.replace(payload, deepstack=(emb,))
    return cases


def test_corrupt_payloads_are_rejected_as_corrupt(tiny_model):
    payload = one_payload(tiny_model)
    for name, bad in corruptions(payload).items():
        with pytest.raises(CorruptPayload) as info:
            generate_with(tiny_model, [bad])
        assert info.value.grpc_code == "DATA_LOSS", name


def test_deepstack_level_count_must_match_qwen3(tiny_models):
    path = tiny_models["qwen3_vl"]
    payload = one_payload(path)
    assert len(payload.deepstack) == engines(path)[1].deepstack_levels > 1
    with pytest.raises(CorruptPayload, match="deepstack"):
        generate_with(path, [dataclasses.replace(payload, deepstack=payload.deepstack[:-1])])


def test_fewer_payloads_than_images_is_invalid(tiny_model):
    with pytest.raises(InvalidRequest):
        generate_with(tiny_model, [one_payload(tiny_model)], n_images=2)


def test_more_payloads_than_images_is_invalid(tiny_model):
    p = one_payload(tiny_model)
    with pytest.raises(InvalidRequest):
        generate_with(tiny_model, [p, p], n_images=1)


def test_text_only_prompt_generates(tiny_model):
    events = run(tiny_model, GenerationInput(question_messages(QUESTION, 0), [], SamplingParams(max_new_tokens=4)))
    assert len(token_ids(events)) == 4


def test_a_bad_request_leaves_the_engine_usable(model):
    before = greedy(model)
    with pytest.raises(CorruptPayload):
        generate_with(model, [dataclasses.replace(one_payload(model), grid_thw=(1, 3, 3))])
    assert greedy(model) == before


# ---- concurrency ---------------------------------------------------------------------------------


def test_concurrent_generations_equal_each_run_alone(tiny_model):
    jobs = [
        request(tiny_model, "What is in this picture?", [(200, 150, 1)]),
        request(tiny_model, "Describe the colours.", [(160, 240, 2)]),
        request(tiny_model, "Count the objects.", [(256, 128, 3)], temperature=1.0, seed=11),
        request(tiny_model, "Compare them.", [(200, 150, 4), (128, 128, 5)], temperature=1.3, seed=12),
    ]
    alone = [token_ids(run(tiny_model, job)) for job in jobs]
    results: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def worker(i):
        barrier.wait()
        results[i] = token_ids(run(tiny_model, jobs[i]))

    for _ in range(2):
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == alone
    assert len({tuple(r) for r in alone}) == len(jobs)  # the jobs really differ


# ---- positions -----------------------------------------------------------------------------------


def reference_text_inputs(path: str, question: str) -> dict:
    """reference_inputs for a prompt without images (the image processor refuses an empty list)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": question}]}], tokenize=False,
        add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return {"input_ids": ids, "mm_token_type_ids": torch.zeros_like(ids), "image_grid_thw": None}


@pytest.mark.parametrize("images", [(), ((200, 150, 0),), ((256, 256, 4), (400, 150, 5))],
                         ids=["no-image", "one-image", "two-images"])
def test_mrope_positions_equal_transformers_rope_index(tiny_model, images):
    pics = [image(*spec) for spec in images]
    inputs = reference_inputs(tiny_model, pics, QUESTION) if pics else reference_text_inputs(tiny_model, QUESTION)
    model = reference_model(tiny_model)
    expected, expected_delta = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"])

    grids = [tuple(int(v) for v in g) for g in inputs["image_grid_thw"]] if pics else []
    merge = model.config.vision_config.spatial_merge_size
    positions, delta = mrope_positions(inputs["mm_token_type_ids"][0], grids, merge)
    assert torch.equal(positions, expected[:, 0])
    assert delta == int(expected_delta)

    # the decoder builds the same prompt ids, and starts decoding at L + delta on every axis
    engine = engines(tiny_model)[1]
    seq = engine.prepare([question_messages(QUESTION, len(pics))], payloads(tiny_model, *images)).seqs[0]
    assert seq.prompt.ids == inputs["input_ids"][0].tolist()
    assert torch.equal(seq.prompt.positions, expected[:, 0])
    length = len(seq.prompt)
    assert seq.prompt.next_position == length + delta
    seq.append(7)
    assert seq.positions(length, 1).tolist() == [[length + delta]] * 3
