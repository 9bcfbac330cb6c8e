"""One scheduler for every request: continuous batching, chunked prefill that keeps streams
moving, cancellation wherever a request is, and the bounds the engine enforces itself."""

from __future__ import annotations

import queue
import threading

import pytest
import torch

from engines import engines, image_payload, request, tokens
from services.llm_decoder.engine import DecoderEngine, GenerationInput
from services.llm_decoder.request import END
from shared.sampling import SamplingParams
from shared.errors import Overloaded, TooLarge
from shared.fingerprint import largest_image_tokens
from shared.payload import EmbeddingPayload
from shared.schema import question_messages

# text only: the tiny seed-0 Qwen3-VL checkpoint answers it for thousands of tokens without an EOS
LONG = GenerationInput(question_messages("What is in this picture?", 0), [], SamplingParams(max_new_tokens=3000))


class Stream:
    """A request submitted to an engine, its outputs collected as they come."""

    def __init__(self, engine: DecoderEngine, req: GenerationInput, labels: list[str] | None = None):
        self.engine, self.outputs = engine, queue.SimpleQueue()
        self.request = engine.prepare([req.messages], req.payloads, req.sampling, req.image_ids,
                                      None if labels is None else [labels])
        engine.submit(self.request, self.outputs.put)

    def next(self):
        return self.outputs.get(timeout=120)

    def rest(self) -> list:
        items = []
        while (item := self.next()) is not END:
            items.append(item)
        return items

    @property
    def seq_ids(self) -> set[int]:
        return {seq.id for seq in self.request.seqs}


def steps_with(engine: DecoderEngine, ids: set[int]) -> list:
    return [r for r in engine.stats.records if ids & (set(r.prefill) | set(r.decode))]


def test_concurrent_requests_join_the_running_batch_and_equal_solo_runs(tiny_model):
    decoder = DecoderEngine(tiny_model)
    jobs = [request(*image_payload(tiny_model, seed)[:2], q, max_new_tokens=10 + seed % 5)
            for seed, q in zip((61, 62, 63, 64), ("What?", "Why?", "Describe the colours.", "Count them."))]
    jobs.append(GenerationInput(question_messages("No image at all.", 0), [], SamplingParams(max_new_tokens=7)))
    jobs.append(request(*image_payload(tiny_model, 65)[:2], "Sampled.", max_new_tokens=9, temperature=1.2, seed=5))
    solo = [tokens(engines(tiny_model)[1].generate(job)) for job in jobs]
    results: dict[int, list[int]] = {}
    barrier = threading.Barrier(len(jobs))

    def run(i):
        barrier.wait()
        results[i] = tokens(decoder.generate(jobs[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(jobs))] == solo
    assert max(len(r.decode) + len(r.prefill) for r in decoder.stats.records) > 1  # steps advanced several


def test_cancelled_waiting_request_is_never_prefilled(tiny_models):
    decoder = DecoderEngine(tiny_models["qwen3_vl"], max_batch=1)
    running = Stream(decoder, LONG)
    assert running.next()[1].token_id is not None  # it holds the one row
    waiting = Stream(decoder, GenerationInput(question_messages("Hello?", 0), [], SamplingParams(max_new_tokens=4)))
    decoder.cancel(waiting.request)
    assert decoder.stats.wait(lambda _: decoder.scheduler.dropped["waiting"] == 1)
    decoder.cancel(running.request)
    assert decoder.stats.wait(lambda _: not decoder.scheduler.has_work())
    assert steps_with(decoder, waiting.seq_ids) == []  # never prefilled, never decoded
    assert decoder.blocks.referenced == decoder.blocks.promised == 0


def test_cancelled_running_generation_stops_and_frees_its_blocks(tiny_models):
    decoder = DecoderEngine(tiny_models["qwen3_vl"])
    stream = Stream(decoder, LONG)
    for _ in range(3):
        stream.next()
    decoder.cancel(stream.request)
    assert decoder.stats.wait(lambda _: not decoder.scheduler.has_work())
    assert decoder.scheduler.dropped["running"] == 1
    assert decoder.blocks.referenced == decoder.blocks.promised == 0 and decoder.scheduler.running == []
    assert len(steps_with(decoder, stream.seq_ids)) < 100  # it did not run on to its 3000 tokens


def test_running_classify_cancelled_frees_its_rows_and_blocks(tiny_models):
    path = tiny_models["qwen2_vl"]
    decoder = DecoderEngine(path, max_step_tokens=16)  # the prompt takes several steps
    payload, img_id, _ = image_payload(path, seed=90)
    labels = [f"answer number {i} is the one" for i in range(40)]  # multi-token: 40 label rows
    stream = Stream(decoder, request(payload, img_id, "Which answer?"), labels)
    assert decoder.stats.wait(lambda _: steps_with(decoder, stream.seq_ids))  # it is running
    decoder.cancel(stream.request)
    assert decoder.stats.wait(lambda _: not decoder.scheduler.has_work())
    assert decoder.blocks.referenced == decoder.blocks.promised == 0 and decoder.scheduler.running == []
    after = tokens(decoder.generate(request(payload, img_id, "Still serving?", 3)))
    assert len(after) == 3


def test_chunked_prefill_keeps_running_streams_advancing(tiny_models):
    """A max-size image prompt (16384 image tokens) is prefilled in chunks between decode steps."""
    path = tiny_models["qwen3_vl"]  # LONG runs on without an end-of-sequence token on this checkpoint
    decoder = DecoderEngine(path, max_step_tokens=2048)
    payload = max_size_payload(decoder)
    big = request(payload, payload.image_id, "What?", max_new_tokens=4)
    running = Stream(decoder, LONG)
    running.next()
    newcomer = Stream(decoder, big)
    answer = [event.token_id for _, event in newcomer.rest() if event.token_id is not None]
    decoder.cancel(running.request)
    assert running.next()[1].finish_reason is None  # still running when the newcomer was done
    chunks = [r for r in decoder.stats.records if newcomer.seq_ids & set(r.prefill)]
    assert len(chunks) >= 16384 // 2048  # prefilled in chunks, never in one step
    assert all(running.seq_ids & set(r.decode) for r in chunks)  # the stream got a token with every chunk
    assert max(sum(r.prefill.values()) + len(r.decode) for r in chunks) <= 2048  # the step's token budget
    assert answer == tokens(engines(path)[1].generate(big))


def max_size_payload(decoder: DecoderEngine) -> EmbeddingPayload:
    """Embeddings of the largest image the processor allows (random: the vision tower takes minutes
    on an image this size, and scheduling does not depend on the values)."""
    tokens_ = largest_image_tokens(decoder.checkpoint.path)
    side = int(tokens_ ** 0.5) * decoder.merge_size
    assert tokens_ == 16384 and side * side // decoder.merge_size ** 2 == tokens_
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(tokens_, decoder.hidden_size, generator=gen) for _ in range(1 + decoder.deepstack_levels)]
    return EmbeddingPayload(rows[0], (1, side, side), decoder.fingerprint, tuple(rows[1:]), "e" * 64)


def test_full_queue_is_overloaded_with_a_retry_hint(tiny_models):
    decoder = DecoderEngine(tiny_models["qwen3_vl"], max_batch=1, max_queue=1)
    running = Stream(decoder, LONG)
    running.next()
    waiting = Stream(decoder, LONG)
    with pytest.raises(Overloaded, match="queue full.*VLSPLIT_MAX_QUEUE=1.*retry"):
        Stream(decoder, LONG)
    for stream in (running, waiting):
        decoder.cancel(stream.request)
    assert decoder.stats.wait(lambda _: not decoder.scheduler.has_work())


# ---- bounds the engine enforces itself: each at its limit, and one past it -----------------------


@pytest.fixture(scope="module")
def bounded(tiny_models):
    """qwen2_vl with small bounds; its context fits a two-image prompt and 5 new tokens."""
    path = tiny_models["qwen2_vl"]
    payload, img_id, _ = image_payload(path, seed=92, width=112, height=112)
    length = len(engines(path)[1].prepare([question_messages("Compare.", 2)], [payload] * 2).seqs[0].prompt)
    decoder = DecoderEngine(path, max_model_len=length + 5, max_images=2, max_rows=3, max_labels=3,
                            max_label_tokens=4, max_checks=2, max_stop=2, max_stop_chars=4,
                            max_new_tokens_limit=100)
    return decoder, payload, img_id


def prepare(decoder, payload, img_id, *, rows=1, images=1, max_new_tokens=5, stop=(), labels=None, checks=1):
    conversations = [question_messages("Hi?" if images == 1 else "Compare.", images)] * (checks if labels else rows)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, stop=stop)
    return decoder.prepare(conversations, [payload] * images, sampling, (img_id,) * images,
                           [labels] * checks if labels else None)


BOUNDS = {  # name: (keyword arguments at the limit, one past it, the words the error must hold)
    "context": ({"images": 2, "max_new_tokens": 5}, {"images": 2, "max_new_tokens": 6}, "context limit"),
    "images": ({"images": 2, "max_new_tokens": 1}, {"images": 3, "max_new_tokens": 1}, "VLSPLIT_MAX_IMAGES"),
    "rows": ({"rows": 3}, {"rows": 4}, "VLSPLIT_MAX_ROWS"),
    "labels": ({"labels": ["a", "b", "c"]}, {"labels": ["a", "b", "c", "d"]}, "VLSPLIT_MAX_LABELS"),
    "label_tokens": ({"labels": ["a b c d"]}, {"labels": ["a b c d e"]}, "VLSPLIT_MAX_LABEL_TOKENS"),
    "checks": ({"labels": ["a"], "checks": 2}, {"labels": ["a"], "checks": 3}, "VLSPLIT_MAX_CHECKS"),
    "stop_strings": ({"stop": ("x", "y")}, {"stop": ("x", "y", "z")}, "VLSPLIT_MAX_STOP"),
    "stop_chars": ({"stop": ("abcd",)}, {"stop": ("abcde",)}, "VLSPLIT_MAX_STOP_CHARS"),
    "new_tokens": (None, {"max_new_tokens": 101}, "the limit 100"),
}


@pytest.mark.parametrize("bound", BOUNDS)
def test_each_bound_at_its_limit_and_one_past(bounded, bound):
    decoder, payload, img_id = bounded
    at, past, words = BOUNDS[bound]
    if at is not None:
        assert prepare(decoder, payload, img_id, **at).seqs
    with pytest.raises(TooLarge, match=words) as info:
        prepare(decoder, payload, img_id, **past)
    assert info.value.grpc_code == "INVALID_ARGUMENT"


def test_kv_blocks_per_request_at_the_limit_and_one_past(tiny_models):
    path = tiny_models["qwen2_vl"]
    engine = engines(path)[1]
    prompt = GenerationInput(question_messages("Hi?", 0), [], SamplingParams(max_new_tokens=1))
    length = len(engine.prepare([prompt.messages], []).seqs[0].prompt)
    blocks = -(-(length + 1) // 16)
    decoder = DecoderEngine(path, max_request_blocks=blocks)
    fits = decoder.prepare([prompt.messages], [], SamplingParams(max_new_tokens=blocks * 16 - length))
    assert fits.seqs
    with pytest.raises(TooLarge, match=f"the limit is {blocks} blocks .*VLSPLIT_MAX_REQUEST_BLOCKS"):
        decoder.prepare([prompt.messages], [], SamplingParams(max_new_tokens=blocks * 16 - length + 1))


# ---- robustness (from review) -------------------------------------------------------------------


def test_label_rows_are_never_split_across_steps(tiny_models):
    """A label row is scored from all its positions at once, even when a step's budget is small."""
    path = tiny_models["qwen2_vl"]
    payload, img_id, _ = image_payload(path, seed=93)
    labels = [f"the answer is number {i} of them all" for i in range(12)] + ["a much longer label " * 3]
    small = DecoderEngine(path, max_step_tokens=16)  # rows of 8-9 tokens, and one longer than any step
    scores = small.classify(request(payload, img_id, "Which?"), labels)
    expected = engines(path)[1].classify(request(payload, img_id, "Which?"), labels)
    assert [s.label for s in scores] == [s.label for s in expected]
    assert [s.logprob for s in scores] == pytest.approx([s.logprob for s in expected], abs=1e-4)


def test_tiny_temperature_is_greedy_and_the_engine_survives(tiny_models):
    path = tiny_models["qwen2_vl"]
    payload, img_id, _ = image_payload(path, seed=94)
    decoder = engines(path)[1]
    assert tokens(decoder.generate(request(payload, img_id, "What?", temperature=1e-40))) == \
        tokens(decoder.generate(request(payload, img_id, "What?")))


def test_an_engine_bug_fails_the_requests_it_held_and_the_engine_goes_on(tiny_models, monkeypatch):
    path = tiny_models["qwen2_vl"]
    decoder = DecoderEngine(path)
    prompt = GenerationInput(question_messages("Hello?", 0), [], SamplingParams(max_new_tokens=3))
    original = decoder.scheduler.computed
    monkeypatch.setattr(decoder.scheduler, "computed", lambda chunk: (_ for _ in ()).throw(KeyError("bug")))
    with pytest.raises(KeyError, match="bug"):
        list(decoder.generate(prompt))
    monkeypatch.setattr(decoder.scheduler, "computed", original)
    assert len(tokens(decoder.generate(prompt))) == 3
    assert decoder.blocks.referenced == decoder.blocks.promised == 0


def test_a_warm_request_holds_its_images_blocks_until_its_last_row_is_admitted(tiny_models):
    path = tiny_models["qwen3_vl"]
    payload, img_id, _ = image_payload(path, seed=95)
    decoder = DecoderEngine(path, max_batch=1)  # its rows are admitted one after another
    tokens(decoder.generate(request(payload, img_id, "First?", 2)))  # the image's blocks are cached
    rows = [request(payload, img_id, f"Question {i}?", 4) for i in range(3)]
    warm = decoder.prepare([r.messages for r in rows], None, [r.sampling for r in rows], (img_id,))
    outputs = queue.SimpleQueue()
    decoder.submit(warm, outputs.put)
    outputs.get(timeout=60)  # the first row is running; the others wait for the one row
    held = list(warm.held)
    assert held and not set(held) & set(decoder.blocks.evictable)  # referenced: nothing can evict them
    while outputs.get(timeout=60) is not END:
        pass
    assert warm.held == [] and decoder.blocks.referenced == 0


def test_a_request_blocked_on_the_pool_is_not_overtaken(tiny_models):
    path = tiny_models["qwen3_vl"]
    per_token = engines(path)[1].runner.pool.kv[:, :, :, 0].numel() * 4
    decoder = DecoderEngine(path, kv_cache_bytes=per_token * 16 * 40)  # 40 blocks
    hello = question_messages("Hello?", 0)
    running = Stream(decoder, GenerationInput(LONG.messages, [], SamplingParams(max_new_tokens=400)))  # 26 blocks
    running.next()
    big = Stream(decoder, GenerationInput(hello, [], SamplingParams(max_new_tokens=300)))  # 20: must wait
    small = Stream(decoder, GenerationInput(hello, [], SamplingParams(max_new_tokens=10)))  # 2: would fit
    big_first = big.next()
    assert big_first is not END

    def first_steps(stats) -> dict[int, int]:
        return {id_: i for i, r in enumerate(stats.records) for id_ in (*r.prefill, *r.decode)}

    # the token reaches the stream before its step's record is appended: wait for the record
    assert decoder.stats.wait(lambda stats: set(big.seq_ids) <= set(first_steps(stats)))
    first_step = first_steps(decoder.stats)
    never = len(decoder.stats.records)  # small has not run at all yet: later than big, as it must be
    assert min(first_step[s] for s in big.seq_ids) <= min(first_step.get(s, never) for s in small.seq_ids)
    for stream in (running, big, small):
        decoder.cancel(stream.request)
