"""Prefix-KV reuse and batched questions in the decoder engine."""

from __future__ import annotations

from functools import lru_cache

import torch

from conftest import make_image
from reference import reference_tokens
from vlsplit.services.llm_decoder import engine as engine_module
from vlsplit.services.llm_decoder.batch import generate_batch
from vlsplit.services.llm_decoder.engine import DecoderEngine, GenerationRequest
from vlsplit.services.llm_decoder.prefix_cache import PrefixCache, PrefixKey, cache_bytes
from vlsplit.services.llm_decoder.sampling import SamplingParams
from vlsplit.services.vision_encoder.engine import VisionEngine
from vlsplit.shared.images import image_id, load_image
from vlsplit.shared.processor import question_messages

QUESTIONS = ["What?", "What is in this picture?", "Describe the colours you can see, please.",
             "Is it day or night?", "Count the objects in the image and list them one by one.", "Why?",
             "Where could this have been taken, and by whom?", "Tell me a story about it."]


@lru_cache(maxsize=None)
def engines(path: str) -> tuple[VisionEngine, DecoderEngine]:
    return VisionEngine(path), DecoderEngine(path)


def request(payload, img_id: str, question: str, max_new_tokens: int = 12, **sampling) -> GenerationRequest:
    return GenerationRequest(question_messages(question), [payload],
                             SamplingParams(max_new_tokens=max_new_tokens, **sampling), (img_id,))


def tokens(events) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def image_payload(path: str, seed: int):
    data = make_image(256, 192, seed=seed)
    encoder, _ = engines(path)
    return encoder.encode([load_image(data)])[0], image_id(data), load_image(data)


def prefilled() -> float:
    return engine_module.PREFILL_TOKENS._value.get()


def test_second_question_prefills_only_its_own_tokens_and_matches_a_cold_run(tiny_model):
    _, decoder = engines(tiny_model)
    payload, img_id, image = image_payload(tiny_model, seed=31)
    cold_engine = DecoderEngine(tiny_model, prefix_cache_bytes=0)  # never reuses anything
    first = tokens(decoder.generate(request(payload, img_id, QUESTIONS[0])))
    before = prefilled()
    second = decoder.generate(request(payload, img_id, QUESTIONS[1]))
    second_tokens = tokens(second)
    prompt = decoder.build_prompt(question_messages(QUESTIONS[1]), [payload])
    assert prefilled() - before == prompt.suffix_len  # the image prefix was not recomputed
    assert second_tokens == tokens(cold_engine.generate(request(payload, img_id, QUESTIONS[1])))
    assert first == reference_tokens(tiny_model, [image], QUESTIONS[0], 12)
    assert second_tokens == reference_tokens(tiny_model, [image], QUESTIONS[1], 12)


def test_another_image_or_prefix_is_a_miss(tiny_models):
    path = tiny_models["qwen2_vl"]
    _, decoder = engines(path)
    payload, img_id, _ = image_payload(path, seed=32)
    tokens(decoder.generate(request(payload, img_id, "hi")))
    before = prefilled()
    tokens(decoder.generate(request(payload, "f" * 64, "hi")))  # same pixels, other id: not trusted as equal
    assert prefilled() - before > decoder.build_prompt(question_messages("hi"), [payload]).suffix_len


def test_cached_prefix_is_never_modified_by_continuations(tiny_models):
    path = tiny_models["qwen3_vl"]
    _, decoder = engines(path)
    payload, img_id, _ = image_payload(path, seed=33)
    prompt = decoder.build_prompt(question_messages("hi"), [payload])
    state = decoder.prefix_state(prompt, (img_id,))
    snapshot = [layer.keys.clone() for layer in state.cache.layers]
    tokens(decoder.generate(request(payload, img_id, "a long question to extend the cache " * 3, 20)))
    again = decoder.prefix_state(prompt, (img_id,))
    assert all(torch.equal(a, layer.keys) for a, layer in zip(snapshot, again.cache.layers))


def test_prefix_cache_is_bounded_in_bytes_and_evicts_oldest(tiny_models):
    path = tiny_models["qwen2_vl"]
    _, decoder = engines(path)
    states = []
    for seed in (34, 35, 36):
        payload, img_id, _ = image_payload(path, seed)
        prompt = decoder.build_prompt(question_messages("hi"), [payload])
        states.append((PrefixKey.of("fp", (img_id,), prompt.ids[: prompt.prefix_len]),
                       decoder.prefix_state(prompt)))
    size = cache_bytes(states[0][1].cache)
    cache = PrefixCache(max_bytes=2 * size + size // 2)
    for key, state in states:
        cache.put(key, state.cache, state.next_positions)
    assert cache.used <= cache.max_bytes
    assert states[0][0] not in cache and states[1][0] in cache and states[2][0] in cache


def test_batched_questions_equal_separate_generations(tiny_model):
    _, decoder = engines(tiny_model)
    payload, img_id, _ = image_payload(tiny_model, seed=37)
    separate = [tokens(decoder.generate(request(payload, img_id, q, max_new_tokens=6 + i)))
                for i, q in enumerate(QUESTIONS)]
    batched: dict[int, list[int]] = {i: [] for i in range(len(QUESTIONS))}
    finals = {}
    for index, event in generate_batch(decoder, [request(payload, img_id, q, max_new_tokens=6 + i)
                                                 for i, q in enumerate(QUESTIONS)]):
        if event.token_id is not None:
            batched[index].append(event.token_id)
        if event.finish_reason:
            finals[index] = event
    assert [batched[i] for i in range(len(QUESTIONS))] == separate
    assert sorted(finals) == list(range(len(QUESTIONS)))


def test_warm_start_needs_no_payload_and_matches(tiny_model):
    _, decoder = engines(tiny_model)
    payload, img_id, _ = image_payload(tiny_model, seed=38)
    messages = question_messages(QUESTIONS[2])
    assert decoder.warm_start(messages, (img_id,)) is None  # never seen: the payload is needed
    with_payload = tokens(decoder.generate(request(payload, img_id, QUESTIONS[2])))
    warm = decoder.warm_start(messages, (img_id,))
    assert warm is not None
    before = prefilled()
    without = tokens(decoder.generate(GenerationRequest(messages, [], SamplingParams(max_new_tokens=12),
                                                        (img_id,), warm)))
    assert without == with_payload
    assert prefilled() - before == decoder.build_prompt(messages, [payload]).suffix_len


def test_continuous_batching_joins_running_requests_and_matches_solo_runs(tiny_model):
    import threading

    from vlsplit.services.llm_decoder.scheduler import BATCH_SIZE, Scheduler

    encoder, decoder = engines(tiny_model)
    jobs = []
    for seed, question in zip((61, 62, 63, 64), QUESTIONS):
        payload, img_id, _ = image_payload(tiny_model, seed)
        jobs.append(request(payload, img_id, question, max_new_tokens=10 + seed % 5))
    jobs.append(GenerationRequest(question_messages("No image at all.", 0), [], SamplingParams(max_new_tokens=7)))
    solo = [tokens(decoder.generate(job)) for job in jobs]
    scheduler = Scheduler(decoder, max_batch=8)
    results: dict[int, list[int]] = {}
    barrier = threading.Barrier(len(jobs))

    def run(i):
        barrier.wait()
        results[i] = tokens(scheduler.stream(jobs[i]))

    def observed() -> tuple[float, float]:  # (sum of batch sizes, number of steps)
        samples = {s.name: s.value for s in BATCH_SIZE.collect()[0].samples}
        return samples["vlsplit_decoder_batch_size_sum"], samples["vlsplit_decoder_batch_size_count"]

    sum_before, steps_before = observed()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(jobs))] == solo
    sum_after, steps_after = observed()
    assert sum_after - sum_before > steps_after - steps_before  # some steps advanced several requests
