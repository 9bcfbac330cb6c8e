"""Block KV with shared prefixes: any prompt that shares a prefix reuses its blocks (another question
about the same image, a second turn, the same system prompt), answers stay token-exact, the pool
is never exceeded, and what the pool cannot hold is refused with the limit named."""

from __future__ import annotations

import pytest
import torch

from engines import batch_tokens, engines, image_payload, request, tokens
from reference import reference_tokens
from services.llm_decoder.engine import DecoderEngine, GenerationInput, NeedPayload
from services.llm_decoder.request import END
from shared.sampling import SamplingParams
from shared.errors import TooLarge
from shared.schema import question_messages

QUESTIONS = ["What?", "What is in this picture?", "Describe the colours you can see, please.",
             "Is it day or night?", "Count the objects in the image and list them one by one.", "Why?",
             "Where could this have been taken, and by whom?", "Tell me a story about it."]


def shared(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def prompt_of(decoder: DecoderEngine, messages, payloads, image_ids=()):
    return decoder.prepare([messages], payloads, image_ids=image_ids).seqs[0].prompt


def cold(path: str) -> DecoderEngine:
    """An engine whose pool is too small to keep anything cached between requests."""
    return DecoderEngine(path, kv_cache_bytes=1 << 22)


def test_second_question_prefills_only_its_own_tokens_and_matches_cold_and_monolithic(tiny_model):
    decoder = engines(tiny_model)[1]
    payload, img_id, image = image_payload(tiny_model, seed=31)
    first = tokens(decoder.generate(request(payload, img_id, QUESTIONS[0])))
    before = decoder.prefilled_tokens
    second = tokens(decoder.generate(request(payload, img_id, QUESTIONS[1])))
    prompt = prompt_of(decoder, question_messages(QUESTIONS[1]), [payload])
    reused = shared(prompt.ids, prompt_of(decoder, question_messages(QUESTIONS[0]), [payload]).ids)
    assert reused >= prompt.cache_point  # the image and all before it
    assert decoder.prefilled_tokens - before == len(prompt) - reused  # only what the question does not share
    assert second == tokens(cold(tiny_model).generate(request(payload, img_id, QUESTIONS[1])))
    assert first == reference_tokens(tiny_model, [image], QUESTIONS[0], 12)
    assert second == reference_tokens(tiny_model, [image], QUESTIONS[1], 12)


def test_another_image_id_is_a_miss(tiny_models):
    path = tiny_models["qwen2_vl"]
    decoder = engines(path)[1]
    payload, img_id, _ = image_payload(path, seed=32)
    tokens(decoder.generate(request(payload, img_id, "hi")))
    before = decoder.prefilled_tokens
    other = payload.named("f" * 64)  # same pixels, another id: never trusted as equal
    tokens(decoder.generate(request(other, "f" * 64, "hi")))
    prompt = prompt_of(decoder, question_messages("hi"), [other])
    # the text before the image is reused, nothing from the image's first token on
    assert decoder.prefilled_tokens - before == len(prompt) - prompt.images[0].start


def test_the_same_image_id_with_another_grid_is_a_miss(tiny_models):
    """An image's key binds its grid: KV computed for one grid is never served for another."""
    path = tiny_models["qwen2_vl"]
    decoder = engines(path)[1]
    payload, img_id, _ = image_payload(path, seed=44, width=224, height=224)
    other, _, _ = image_payload(path, seed=45, width=448, height=224)
    tokens(decoder.generate(request(payload, img_id, "hi", 2)))
    before = decoder.prefilled_tokens
    claimed = other.named(img_id)  # the same id, another grid
    tokens(decoder.generate(request(claimed, img_id, "hi", 2)))
    prompt = prompt_of(decoder, question_messages("hi"), [claimed])
    assert decoder.prefilled_tokens - before == len(prompt) - prompt.images[0].start


def test_warm_start_needs_no_payload_and_matches(tiny_model):
    decoder = engines(tiny_model)[1]
    payload, img_id, _ = image_payload(tiny_model, seed=38)
    messages = question_messages(QUESTIONS[3])
    with pytest.raises(NeedPayload):  # never seen: the payload is needed
        decoder.prepare([messages], None, image_ids=(img_id,))
    tokens(decoder.generate(request(payload, img_id, QUESTIONS[2])))
    before = decoder.prefilled_tokens
    without = tokens(decoder.generate(GenerationInput(messages, [], SamplingParams(max_new_tokens=12), (img_id,))))
    assert without == tokens(cold(tiny_model).generate(request(payload, img_id, QUESTIONS[3])))
    prompt = prompt_of(decoder, messages, [payload])
    reused = shared(prompt.ids, prompt_of(decoder, question_messages(QUESTIONS[2]), [payload]).ids)
    assert reused >= prompt.cache_point
    assert decoder.prefilled_tokens - before == len(prompt) - reused


def test_cached_blocks_are_never_modified_by_continuations(tiny_models):
    path = tiny_models["qwen3_vl"]
    decoder = engines(path)[1]
    payload, img_id, _ = image_payload(path, seed=33)
    tokens(decoder.generate(request(payload, img_id, "hi", 2)))
    seq = decoder.prepare([question_messages("hi")], [payload], image_ids=(img_id,)).seqs[0]
    match = decoder.blocks.match(seq, len(seq.prompt), len(seq.prompt) - 1)
    assert match.tokens >= seq.prompt.cache_point  # the image's blocks are cached
    slots = torch.cat([torch.arange(b * 16, b * 16 + 16) for b in match.blocks + [match.tail]])
    snapshot = decoder.runner.pool.kv[:, :, :, slots].clone()
    tokens(decoder.generate(request(payload, img_id, "a long question to extend the cache " * 3, 20)))
    assert torch.equal(decoder.runner.pool.kv[:, :, :, slots], snapshot)


def test_second_turn_reuses_the_first_turn_and_equals_monolithic(tiny_model):
    decoder = engines(tiny_model)[1]
    payload, img_id, image = image_payload(tiny_model, seed=39)
    turn1 = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    events = list(decoder.generate(GenerationInput(turn1, [payload], SamplingParams(max_new_tokens=10), (img_id,))))
    answer = tokens(events)
    # the KV of every answer token was computed, but of the last when the answer ran to its length
    computed = answer if events[-1].finish_reason == "stop" else answer[:-1]
    first = prompt_of(decoder, turn1, [payload]).ids + computed
    text = decoder.prompts.decode(answer)
    turn2 = turn1 + [{"role": "assistant", "content": [{"type": "text", "text": text}]},
                     {"role": "user", "content": [{"type": "text", "text": "And the colours?"}]}]
    ids = prompt_of(decoder, turn2, [payload]).ids
    reused = shared(ids, first)
    assert reused >= len(first) - len(computed)  # at least the whole first prompt

    before = decoder.prefilled_tokens
    second = tokens(decoder.generate(GenerationInput(turn2, [], SamplingParams(max_new_tokens=10), (img_id,))))
    assert decoder.prefilled_tokens - before == len(ids) - reused  # only what the first turn did not compute
    assert second == reference_tokens(tiny_model, [image], turn2, 10)


def test_system_prompt_and_two_images_equal_monolithic(tiny_model):
    decoder = engines(tiny_model)[1]
    (a, id_a, image_a), (b, id_b, image_b) = image_payload(tiny_model, 40), image_payload(tiny_model, 41, 160, 240)
    messages = [{"role": "system", "content": [{"type": "text", "text": "You compare pictures."}]},
                {"role": "user", "content": [{"type": "text", "text": "First:"}, {"type": "image"},
                                             {"type": "text", "text": "and second:"}, {"type": "image"},
                                             {"type": "text", "text": "How do they differ?"}]}]
    ours = tokens(decoder.generate(GenerationInput(messages, [a, b], SamplingParams(max_new_tokens=12), (id_a, id_b))))
    assert ours == reference_tokens(tiny_model, [image_a, image_b], messages, 12)
    swapped = tokens(decoder.generate(GenerationInput(messages, [b, a], SamplingParams(max_new_tokens=12), (id_b, id_a))))
    assert swapped == reference_tokens(tiny_model, [image_b, image_a], messages, 12)  # order matters, and is kept


def test_the_same_system_prompt_is_computed_once(tiny_models):
    path = tiny_models["qwen2_vl"]
    decoder = engines(path)[1]
    system = {"role": "system", "content": [{"type": "text", "text": "You are a careful assistant. " * 12}]}
    ask = [[system, {"role": "user", "content": [{"type": "text", "text": q}]}] for q in ("Hi?", "Who are you?")]
    tokens(decoder.generate(GenerationInput(ask[0], [], SamplingParams(max_new_tokens=2))))
    before = decoder.prefilled_tokens
    tokens(decoder.generate(GenerationInput(ask[1], [], SamplingParams(max_new_tokens=2))))
    first, second = (prompt_of(decoder, m, []).ids for m in ask)
    assert shared(first, second) > 3 * decoder.config.block_size
    assert decoder.prefilled_tokens - before == len(second) - shared(first, second)


def test_askmany_64_questions_store_the_image_prefix_once_and_equal_separate_generations(tiny_models):
    path = tiny_models["qwen2_vl"]
    payload, img_id, _ = image_payload(path, seed=42, width=320, height=320)
    questions = [f"Question {i}: {QUESTIONS[i % len(QUESTIONS)]}" for i in range(64)]
    jobs = [request(payload, img_id, q, max_new_tokens=4 + i % 5) for i, q in enumerate(questions)]
    separate = engines(path)[1]
    alone = [tokens(separate.generate(job)) for job in jobs]

    decoder = DecoderEngine(path)  # fresh: nothing of the image is cached
    assert batch_tokens(decoder, jobs) == alone
    prompts = [prompt_of(decoder, question_messages(q), [payload]) for q in questions]
    point, bs = prompts[0].cache_point, decoder.config.block_size
    assert decoder.prefilled_tokens == point + sum(len(p) - point for p in prompts)  # the image once
    own = max(-(-(len(p) + 8) // bs) - point // bs for p in prompts)
    assert decoder.stats.peak_blocks <= -(-point // bs) + 64 * own  # the prefix's blocks stored once
    assert decoder.stats.peak_blocks < 64 * (point // bs)  # far below one copy per question


def test_kv_pool_never_exceeds_its_budget_under_4_clients_with_64_questions(tiny_models):
    path = tiny_models["qwen2_vl"]
    per_token = engines(path)[1].runner.pool.kv[:, :, :, 0].numel() * 4
    decoder = DecoderEngine(path, kv_cache_bytes=per_token * 16 * 160, max_batch=256)  # one request needs 130 blocks
    requests, expected = [], []
    for client in range(4):
        payload, img_id, _ = image_payload(path, seed=70 + client, width=128, height=128)
        jobs = [request(payload, img_id, f"Question {i}?", max_new_tokens=8) for i in range(64)]
        expected.append([tokens(engines(path)[1].generate(job)) for job in jobs[:4]])
        requests.append(decoder.prepare([j.messages for j in jobs], [payload], [j.sampling for j in jobs], (img_id,)))
    outputs = [[] for _ in requests]
    for request_, out in zip(requests, outputs):  # all four queued at once: they compete for the pool
        decoder.submit(request_, out.append)
    assert all(decoder.stats.wait(lambda _: out and out[-1] is END) for out in outputs)
    for out, want in zip(outputs, expected):
        answers: dict[int, list[int]] = {}
        for index, event in out[:-1]:
            answers.setdefault(index, []).extend([event.token_id] if event.token_id is not None else [])
        assert [answers[i] for i in range(4)] == want and len(answers) == 64
    assert decoder.stats.peak_committed <= decoder.blocks.num_blocks == 160
    assert decoder.scheduler.blocked > 0  # the pool was really the limit: rows waited for blocks
    assert decoder.blocks.referenced == decoder.blocks.promised == 0  # everything returned


def test_request_larger_than_the_pool_is_invalid_naming_the_limit(tiny_models):
    path = tiny_models["qwen2_vl"]
    per_token = engines(path)[1].runner.pool.kv[:, :, :, 0].numel() * 4
    decoder = DecoderEngine(path, kv_cache_bytes=per_token * 16 * 8)  # 8 blocks: 128 tokens
    prompt = GenerationInput(question_messages("Hi?", 0), [], SamplingParams(max_new_tokens=8))
    assert tokens(decoder.generate(prompt))
    long = GenerationInput(question_messages("Hi?", 0), [], SamplingParams(max_new_tokens=200))
    with pytest.raises(TooLarge, match=r"the limit is 8 blocks \(the whole KV pool, VLSPLIT_KV_CACHE_BYTES\)"):
        list(decoder.generate(long))


def test_unreferenced_blocks_are_evicted_oldest_first(tiny_models):
    path = tiny_models["qwen2_vl"]
    per_token = engines(path)[1].runner.pool.kv[:, :, :, 0].numel() * 4
    decoder = DecoderEngine(path, kv_cache_bytes=per_token * 16 * 20)
    images = [image_payload(path, seed=s, width=224, height=224) for s in (80, 81, 82, 83)]
    for payload, img_id, _ in images:
        tokens(decoder.generate(request(payload, img_id, "hi", 2)))
    warm = [_warm(decoder, img_id) for _, img_id, _ in images]
    assert not warm[0] and warm[-1]  # the oldest image's blocks went first
    assert decoder.blocks.referenced == 0 and len(decoder.blocks.evictable) + len(decoder.blocks.free) == 20


def _warm(decoder: DecoderEngine, img_id: str) -> bool:
    try:
        decoder.prepare([question_messages("hi")], None, image_ids=(img_id,))
        return True
    except NeedPayload:
        return False
