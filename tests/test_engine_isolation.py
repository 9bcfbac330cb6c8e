"""Failure isolation in the decoder engine: a forward that raises fails only the request that causes it
(the step's other requests run again alone and answer exactly as they would have), a step loop that
dies or a step that hangs is reported by `health()` (the server turns NOT_SERVING: test_server_health.py),
and the requests a dead loop held get UNAVAILABLE instead of waiting forever.

The faults are injected by wrapping the engine's model runner (a bug we cannot otherwise trigger on
purpose); everything else is the real engine and model."""

from __future__ import annotations

import threading
import time

import pytest

from engines import image_payload, request, tokens
from services.llm_decoder.engine import DecoderEngine
from shared.errors import Unavailable

POISON = "Poisoned question"


@pytest.fixture
def engine(tiny_models):
    engine = DecoderEngine(tiny_models["qwen2_vl"], step_stall_s=0.3)
    yield engine
    engine.close()


def _poison_ids(engine) -> list[int]:
    return engine.prompts.tokenizer.encode(POISON)


def _contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i:i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def _answers(engine, reqs) -> dict[int, object]:
    """Each request on its own thread, submitted together: token ids, or the exception it raised."""
    out: dict[int, object] = {}

    def run(i, r):
        try:
            out[i] = tokens(engine.generate(r))
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i, r)) for i, r in enumerate(reqs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_a_forward_that_raises_fails_only_the_request_that_causes_it(engine, tiny_models):
    path = tiny_models["qwen2_vl"]
    reqs = [request(*image_payload(path, seed=s)[:2], q, max_new_tokens=8)
            for s, q in [(31, "Describe it."), (32, POISON), (33, "What colour is it?")]]
    solo = {i: tokens(engine.generate(r)) for i, r in enumerate(reqs) if i != 1}
    poison, real_run, calls = _poison_ids(engine), engine.runner.run, []

    def run(chunks):
        calls.append(len({id(c.seq.request) for c in chunks}))
        if any(_contains(c.seq.prompt.ids, poison) for c in chunks):
            raise RuntimeError("injected kernel failure")
        return real_run(chunks)

    engine.runner.run = run
    # hold the step loop until all three are queued, so they share steps
    gate = threading.Event()
    real_step = engine.step
    engine.step = lambda: (gate.wait(30), real_step())[1]
    answers = {}
    worker = threading.Thread(target=lambda: answers.update(_answers(engine, reqs)))
    worker.start()
    assert _queued(engine) >= 3
    gate.set()
    worker.join(120)
    assert isinstance(answers[1], RuntimeError) and "injected kernel failure" in str(answers[1])
    assert answers[0] == solo[0] and answers[2] == solo[2]  # as if the poisoned request had never been there
    assert max(calls) >= 2  # a step held several requests, and was split
    assert engine.health() is None  # a request's failure is not the engine's


def _queued(engine) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with engine.scheduler.changed:
            n = len(engine.scheduler.inbox) + len(engine.scheduler.waiting)
        if n >= 3:
            return n
        engine.scheduler.wait_for_change(engine.scheduler.version, timeout=0.1)
    return 0


def test_a_stuck_step_is_reported_and_clears_when_it_ends(engine, tiny_models):
    path = tiny_models["qwen2_vl"]
    release, real_run = threading.Event(), engine.runner.run
    engine.runner.run = lambda chunks: (release.wait(60), real_run(chunks))[1]
    out = {}
    worker = threading.Thread(target=lambda: out.update(_answers(engine, [
        request(*image_payload(path, seed=34)[:2], "Describe it.", max_new_tokens=2)])))
    worker.start()
    deadline = time.monotonic() + 30
    while (reason := engine.health()) is None:
        assert time.monotonic() < deadline, "a step blocked for 30 s was never reported"
        release.wait(0.05)
    assert "over step_stall_s (0.3s): stuck" in reason
    release.set()
    worker.join(60)
    assert isinstance(out[0], list) and len(out[0]) == 2  # the step finished: its request answered
    assert engine.health() is None


class _Died(BaseException):
    """Not an Exception: what the loop's own guard cannot catch (e.g. a signal delivered into the thread)."""


def test_a_dead_step_loop_fails_what_it_held_and_is_reported(engine, tiny_models):
    path = tiny_models["qwen2_vl"]

    def step():
        raise _Died("injected")

    engine.step = step
    out = _answers(engine, [request(*image_payload(path, seed=35)[:2], "Describe it.", max_new_tokens=2)])
    assert isinstance(out[0], Unavailable) and "the decoder engine stopped (_Died)" in str(out[0])
    engine._thread.join(10)
    assert engine.health() == "the decoder engine's step loop has died (see the log); restart the server"
