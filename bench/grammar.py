"""Constrained decoding cost: llguidance (what the decoder uses) against outlines-core, side by side, on
Qwen's real 151k BPE vocabulary (the bench tokenizer of `make-model --size bench`).

For each response format: the time before the first token can be masked (compile: grammar + per-schema
index), and the time to compute one step's masks for a batch of 1 and 8 constrained rows walking a valid
answer. xgrammar is not measured: its Linux wheel requires triton (see services/llm_decoder/grammar.py).

    .venv/bin/python bench/grammar.py        (make bench-grammar; outlines-core comes with the bench extra)
"""

from __future__ import annotations

import json
import statistics
import time

import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

from services.llm_decoder.grammar import GrammarCompiler, GrammarMask
from shared.sampling import ResponseFormat
from services.model_builder.tokenizer import build_tokenizer

VERDICT = {"type": "object", "additionalProperties": False, "required": ["verdict", "confidence"],
           "properties": {"verdict": {"enum": ["safe", "unsafe", "unsure"]},
                          "confidence": {"type": "integer", "minimum": 0, "maximum": 9}}}
REPORT = {"type": "object", "additionalProperties": False, "required": ["labels", "summary", "people"],
          "properties": {"labels": {"type": "array", "items": {"enum": ["violence", "nudity", "drugs", "none"]},
                                    "maxItems": 4},
                         "summary": {"type": "string", "maxLength": 80},
                         "people": {"type": "integer", "minimum": 0}}}
ANSWERS = {"verdict": '{"verdict":"unsafe","confidence":7}',
           "report": '{"labels":["violence","drugs"],"summary":"two people arguing in a street","people":2}',
           "choices": "unsure"}
FORMATS = {"verdict": ResponseFormat(json_schema=json.dumps(VERDICT)),
           "report": ResponseFormat(json_schema=json.dumps(REPORT)),
           "choices": ResponseFormat(choices=("safe", "unsafe", "unsure"))}


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def llguidance_run(compiler: GrammarCompiler, fmt: ResponseFormat, answer: list[int], rows: int,
                   ) -> tuple[float, float, float]:
    """(compile s per row, mask fill s per step, fill + apply to the logits s per step)."""
    import llguidance.numpy

    start = time.perf_counter()
    matchers = [compiler.matcher(fmt) for _ in range(rows)]
    compile_s = (time.perf_counter() - start) / rows
    mask, logits, fills, steps = GrammarMask(), torch.zeros(rows, compiler.vocab_size), [], []
    bitmask = llguidance.numpy.allocate_token_bitmask(rows, compiler.vocab_size)
    for token in answer:
        start = time.perf_counter()
        llguidance.numpy.fill_next_token_bitmask_par(mask.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        fills.append(time.perf_counter() - start)
        start = time.perf_counter()
        mask.apply(logits, matchers)  # what the decoder's step runs: fill, unpack, mask the rows
        steps.append(time.perf_counter() - start)
        for m in matchers:
            assert m.consume_token(token), m.get_error()
    return compile_s, statistics.median(fills), statistics.median(steps)


def outlines_run(vocabulary, fmt: ResponseFormat, answer: list[int], rows: int, vocab_size: int) -> tuple[float, float]:
    import outlines_core

    regex = ("(" + "|".join(json.dumps(c)[1:-1] for c in fmt.choices) + ")" if fmt.choices
             else outlines_core.json_schema.build_regex_from_schema(fmt.json_schema))
    start = time.perf_counter()
    index = outlines_core.Index(regex, vocabulary)  # the per-schema index over the whole vocabulary
    guides = [outlines_core.Guide(index) for _ in range(rows)]
    compile_s = time.perf_counter() - start
    bitmask = torch.zeros(rows, (vocab_size + 31) // 32, dtype=torch.int32)
    steps = []
    for token in answer:
        start = time.perf_counter()
        for i, guide in enumerate(guides):
            guide.write_mask_into(bitmask[i].data_ptr(), bitmask[i].numel(), bitmask.element_size())
        steps.append(time.perf_counter() - start)
        for guide in guides:
            guide.advance(token)
    return compile_s, statistics.median(steps)


def outlines_vocabulary(tokenizer, eos: int):
    """outlines-core's Vocabulary: each token's text (byte-level BPE characters mapped back to bytes)."""
    import outlines_core

    decoder = {c: b for b, c in bytes_to_unicode().items()}
    pieces: dict[bytes, list[int]] = {}
    for piece, token_id in tokenizer.get_vocab().items():
        if token_id == eos or not all(c in decoder for c in piece):
            continue  # special tokens
        pieces.setdefault(bytes(decoder[c] for c in piece), []).append(token_id)
    return outlines_core.Vocabulary(eos, pieces)


def main() -> None:
    tokenizer = build_tokenizer("qwen2_vl", "qwen")
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    vocab_size = 151_936
    start = time.perf_counter()
    compiler = GrammarCompiler(tokenizer, vocab_size, frozenset([eos]), 64 * 1024)
    compiler.lltokenizer  # noqa: B018 - built once per decoder
    ll_setup = time.perf_counter() - start
    start = time.perf_counter()
    vocabulary = outlines_vocabulary(tokenizer, eos)
    oc_setup = time.perf_counter() - start
    print(f"vocabulary {len(tokenizer)} tokens; once per decoder: llguidance tokenizer {ms(ll_setup)} ms, "
          f"outlines-core Vocabulary {ms(oc_setup)} ms")
    print("| format | rows | llguidance compile ms | outlines-core compile ms | llguidance mask fill ms/step "
          "| outlines-core mask fill ms/step | llguidance fill + apply to logits ms/step |")
    print("|---|---|---|---|---|---|---|")
    for name, fmt in FORMATS.items():
        answer = tokenizer(ANSWERS[name], add_special_tokens=False)["input_ids"]
        for rows in (1, 8):
            ll_compile, ll_fill, ll_step = llguidance_run(compiler, fmt, answer, rows)
            oc_compile, oc_fill = outlines_run(vocabulary, fmt, answer, rows, vocab_size)
            print(f"| {name} | {rows} | {ms(ll_compile)} | {ms(oc_compile)} ({oc_compile / ll_compile:.0f}x) "
                  f"| {ms(ll_fill)} | {ms(oc_fill)} | {ms(ll_step)} |")

if __name__ == "__main__":
    main()
