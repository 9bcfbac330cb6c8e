"""Penalties, logprobs and response formats in the decoder engine, each against a straightforward
implementation on the monolithic transformers model (HF's own repetition penalty, a per-step logits
processor for OpenAI's presence/frequency penalties, HF's raw logits for logprobs)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from engines import engines, image_payload, request, tokens
from reference import reference_inputs, reference_model
from shared.errors import InvalidRequest, TooLarge
from shared.sampling import ResponseFormat, SamplingParams
from services.llm_decoder.sampling import Sampler, _penalize

QUESTION = "Describe the image."


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's definition, one row at a time: logit -= count * frequency + (count > 0) * presence."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        for row, ids in enumerate(input_ids):
            for token in set(ids[self.prompt_len:].tolist()):
                count = int((ids[self.prompt_len:] == token).sum())
                scores[row, token] -= count * self.frequency + self.presence
        return scores


@torch.inference_mode()
def _reference(path: str, image, max_new_tokens: int, **generate) -> tuple[list[int], list[torch.Tensor]]:
    model = reference_model(path)
    inputs = reference_inputs(path, [image], QUESTION)
    if "processor" in generate:
        generate["logits_processor"] = LogitsProcessorList([generate.pop("processor")(inputs["input_ids"].shape[1])])
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, output_logits=True,
                         return_dict_in_generate=True, **generate)
    ids = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    if ids and ids[-1] in eos:
        ids = ids[:-1]
    return ids, [x[0] for x in out.logits]


def _run(path: str, max_new_tokens: int = 16, **sampling):
    payload, img_id, _ = image_payload(path, seed=3)
    return list(engines(path)[1].generate(request(payload, img_id, QUESTION, max_new_tokens=max_new_tokens, **sampling)))


def test_repetition_penalty_matches_transformers(tiny_model):
    _, _, image = image_payload(tiny_model, seed=3)
    expected, _ = _reference(tiny_model, image, 16, repetition_penalty=1.8)
    assert tokens(_run(tiny_model, repetition_penalty=1.8)) == expected


def test_presence_and_frequency_penalties_match_openai_definition(tiny_model):
    _, _, image = image_payload(tiny_model, seed=3)
    plain, _ = _reference(tiny_model, image, 16)
    expected, _ = _reference(tiny_model, image, 16,
                             processor=lambda n: OpenAIPenalties(n, presence=1.5, frequency=2.0))
    got = tokens(_run(tiny_model, presence_penalty=1.5, frequency_penalty=2.0))
    assert got == expected
    assert len(set(got)) >= len(set(plain))  # penalising repeats never makes the answer more repetitive


def test_penalties_leave_unpenalized_rows_alone():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))

    class Seq:
        def __init__(self, tokens, prompt_len):
            self.tokens, self.prompt = tokens, [0] * prompt_len

    samplers = [Sampler(SamplingParams(frequency_penalty=1.0, repetition_penalty=1.5)), Sampler(SamplingParams())]
    out = _penalize(logits, samplers, [Seq([1, 2, 3, 3], 2), Seq([1, 2, 3, 3], 2)])
    assert torch.equal(out[1], logits[1])
    expected = logits[0].clone()
    for t in (1, 2, 3):  # repetition over prompt + answer
        expected[t] = expected[t] * 1.5 if expected[t] < 0 else expected[t] / 1.5
    expected[3] -= 2.0  # generated twice
    assert torch.allclose(out[0], expected)


def test_logprobs_are_the_models_and_top_logprobs_are_the_most_likely(tiny_model):
    _, _, image = image_payload(tiny_model, seed=3)
    expected, logits = _reference(tiny_model, image, 16)
    events = [e for e in _run(tiny_model, logprobs=True, top_logprobs=5) if e.token_id is not None]
    assert [e.token_id for e in events] == expected
    for event, raw in zip(events, logits):
        reference = torch.log_softmax(raw.float(), -1)
        assert event.logprobs.logprob == pytest.approx(float(reference[event.token_id]), abs=1e-4)
        top_ids = [t for t, _ in event.logprobs.top]
        assert len(top_ids) == 5 and top_ids[0] == event.token_id  # greedy picks the most likely
        assert [lp for _, lp in event.logprobs.top] == pytest.approx(reference.topk(5).values.tolist(), abs=1e-4)
    assert all(e.logprobs is None for e in _run(tiny_model) if e.token_id is not None)


def _text(events) -> str:
    return "".join(e.text for e in events)


def test_choices_constrain_the_answer_to_one_of_them(tiny_model):
    choices = ("safe", "unsafe", "unsure")
    for temperature, seed in ((0.0, None), (1.0, 1), (1.0, 2)):
        events = _run(tiny_model, response_format=ResponseFormat(choices=choices), temperature=temperature, seed=seed)
        assert _text(events) in choices
        assert events[-1].finish_reason == "stop"


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["verdict", "score"],
          "properties": {"verdict": {"enum": ["safe", "unsafe"]}, "score": {"type": "integer", "minimum": 0,
                                                                           "maximum": 9}}}


def test_json_schema_answer_parses_and_validates(tiny_model):
    for temperature, seed in ((0.0, None), (1.0, 7)):
        events = _run(tiny_model, 64, response_format=ResponseFormat(json_schema=json.dumps(SCHEMA)),
                      temperature=temperature, seed=seed)
        assert events[-1].finish_reason == "stop"
        jsonschema.validate(json.loads(_text(events)), SCHEMA)


def test_bad_response_formats_are_refused_before_running(tiny_model):
    decoder = engines(tiny_model)[1]
    payload, img_id, _ = image_payload(tiny_model, seed=3)

    def prepare(fmt):
        r = request(payload, img_id, QUESTION, response_format=fmt)
        return decoder.prepare([r.messages], r.payloads, r.sampling, r.image_ids)

    with pytest.raises(InvalidRequest, match="not JSON"):
        prepare(ResponseFormat(json_schema="{oops"))
    for _ in range(2):  # refused again, not served from the compiled-grammar cache
        with pytest.raises(InvalidRequest, match="cannot be compiled"):
            prepare(ResponseFormat(json_schema='{"type": "no-such-type"}'))
    with pytest.raises(TooLarge, match="VLSPLIT_MAX_SCHEMA_BYTES"):
        prepare(ResponseFormat(json_schema=json.dumps({"description": "x" * (decoder.config.max_schema_bytes + 1)})))
    with pytest.raises(InvalidRequest, match="distinct"):
        prepare(ResponseFormat(choices=("a", "a")))
    with pytest.raises(TooLarge, match="VLSPLIT_MAX_LABELS"):
        prepare(ResponseFormat(choices=tuple(f"c{i}" for i in range(decoder.config.max_labels + 1))))


def test_masks_filled_during_the_forward_equal_masks_filled_after_it(tiny_model):
    """The engine starts each step's grammar masks before its forward (GrammarMask.prefetch); apply
    takes them only for the same matchers, else fills them itself: both give the same masked logits."""
    from services.llm_decoder.grammar import GrammarMask

    decoder = engines(tiny_model)[1]
    vocab = decoder.runner.lm_head.out_features
    fmt = ResponseFormat(json_schema=json.dumps(SCHEMA))
    matchers = [decoder.intake.grammars.matcher(fmt), None, decoder.intake.grammars.matcher(fmt)]
    assert matchers[2].consume_token(decoder.prompts.tokenizer.encode("{")[0])  # two different states
    logits = torch.randn(3, vocab)
    want = GrammarMask().apply(logits, matchers)
    mask = GrammarMask()
    mask.prefetch(matchers, vocab)
    assert mask._pending is not None
    torch.testing.assert_close(mask.apply(logits, matchers), want, rtol=0, atol=0)
    mask.prefetch(matchers[:1], vocab)  # prefetched for other rows than apply is given: not used
    torch.testing.assert_close(mask.apply(logits, matchers), want, rtol=0, atol=0)
    assert torch.isinf(want[0]).any() and not torch.isinf(want[1]).any() and not torch.equal(want[0], want[2])


# ---- stop strings: the bound is the setting, not a constant ------------------------------------


def test_stop_string_bound_is_the_setting_at_its_limit_and_one_past(tiny_models):
    """VLSPLIT_MAX_STOP above the old hard-coded 16 works in the decoder and in the gateway's early check."""
    from services.llm_decoder.engine import DecoderEngine
    from services.gateway.servicer import GatewayServicer
    from shared.config import GatewayConfig
    from vlsplit.v1 import common_pb2

    path = tiny_models["qwen2_vl"]
    payload, img_id, _ = image_payload(path, seed=3)
    decoder = DecoderEngine(path, max_stop=20)
    stops = tuple(f"s{i}" for i in range(21))

    def prepare(stop):
        r = request(payload, img_id, QUESTION, stop=stop)
        return decoder.prepare([r.messages], r.payloads, r.sampling, r.image_ids)

    assert prepare(stops[:20]).seqs
    with pytest.raises(TooLarge, match="21 stop strings; the limit is 20 .VLSPLIT_MAX_STOP."):
        prepare(stops)
    gateway = GatewayServicer(GatewayConfig(max_stop=20))
    assert list(gateway._sampling(common_pb2.SamplingParams(stop=stops[:20])).stop) == list(stops[:20])
    with pytest.raises(TooLarge, match="VLSPLIT_MAX_STOP"):
        gateway._sampling(common_pb2.SamplingParams(stop=stops))
    with pytest.raises(TooLarge, match="the limit is 2 "):
        SamplingParams(stop=("a", "b", "c")).validate(4096, max_stop=2)


# ---- a grammar the sampled token breaks is our bug, not the client's ---------------------------


def test_grammar_violation_after_masking_is_an_internal_error(tiny_models, monkeypatch, caplog):
    """With the mask broken (a forbidden token forced to win), the request fails with an error the
    interceptor logs and answers INTERNAL, never INVALID_ARGUMENT; the engine serves the next request."""
    import asyncio

    import grpc

    from services.llm_decoder.grammar import GrammarMask, GrammarViolation
    from shared.errors import VlsplitError
    from shared.interceptor import _Track

    path = tiny_models["qwen2_vl"]
    decoder = engines(path)[1]
    forbidden = decoder.prompts.tokenizer.encode("}")[0]  # a JSON object cannot start with "}"

    def broken_apply(self, logits, matchers):
        out = logits.clone()
        out[:, forbidden] = 1e9
        return out

    monkeypatch.setattr(GrammarMask, "apply", broken_apply)
    with pytest.raises(GrammarViolation) as info:
        _run(path, 8, response_format=ResponseFormat(json_schema=json.dumps(SCHEMA)))
    assert not isinstance(info.value, VlsplitError)

    class Context:
        code = None

        async def abort(self, code, details):
            self.code, self.details = code, details
            raise grpc.aio.AbortError()

    context = Context()
    with caplog.at_level("ERROR", logger="vlsplit.rpc"), pytest.raises(grpc.aio.AbortError):
        asyncio.run(_Track("Generate").fail(info.value, context))
    assert context.code == grpc.StatusCode.INTERNAL and "GrammarViolation" in context.details
    assert any(r.exc_info and r.exc_info[0] is GrammarViolation for r in caplog.records)
    monkeypatch.undo()
    assert tokens(_run(path, 4))  # the engine goes on serving
