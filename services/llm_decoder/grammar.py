"""Constrained answers: a response format compiled to a grammar matcher, applied as a logits mask.

The grammar library is llguidance (one of vLLM's structured-output backends): a Rust wheel with no
runtime dependencies that computes a token mask for the current state in tens of microseconds,
without precomputing anything over the vocabulary per schema. xgrammar's Linux wheel pulls in
triton (hundreds of MB in a CPU image); outlines-core builds an index of the whole vocabulary per
schema up front (seconds for a 150k vocabulary and a non-trivial schema), which a request would wait
for. docs/architecture.md has the measurements.

Per step, for the rows of a batch that have a matcher: one parallel mask fill (`LLExecutor`), one
masked_fill on their logits; after sampling, each matcher consumes its row's token. A finished
grammar allows only end-of-sequence, so the answer ends there.
"""

from __future__ import annotations

import functools
import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import llguidance.hf
import llguidance.numpy  # not llguidance.torch: it compiles a kernel with torch.compile at import (~2 s a start)
import numpy as np
import torch

from shared.errors import InvalidRequest, TooLarge
from shared.sampling import ResponseFormat

# Bounds on what one grammar may cost (llguidance's own fuel limits, per compile and per token).
LIMITS = llguidance.LLParserLimits(max_grammar_size=500_000, step_lexer_fuel=200_000, initial_lexer_fuel=1_000_000)


class GrammarCompiler:
    """Response formats -> matchers for one tokenizer (its llguidance view is built on first use)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: frozenset[int], max_schema_bytes: int):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, sorted(eos_ids)
        self.max_schema_bytes = max_schema_bytes
        self._lltok: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._compiled = functools.lru_cache(maxsize=64)(self._compile)  # grammar text -> unadvanced matcher
        # built in the background from the start (~2 s for Qwen's 151k vocabulary), not by the first request
        threading.Thread(target=lambda: self.lltokenizer, name="grammar-tokenizer", daemon=True).start()

    @property
    def lltokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._lltok is None:
                self._lltok = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                           eos_token=self.eos_ids)
            return self._lltok

    def matcher(self, fmt: ResponseFormat) -> llguidance.LLMatcher:
        """A fresh matcher for `fmt` (intake thread); InvalidRequest when the grammar is refused. A grammar
        is compiled once (the header check, the request and its n rows share it); each row gets a copy."""
        return self._compiled(self.grammar(fmt)).deep_copy()

    def _compile(self, grammar: str) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0, limits=LIMITS)
        if matcher.is_error():
            raise InvalidRequest(f"response_format cannot be compiled: {matcher.get_error()}")
        return matcher  # never advanced: only copied

    def grammar(self, fmt: ResponseFormat) -> str:
        """The llguidance grammar of a validated format (SamplingParams.validate checked the schema is JSON)."""
        if fmt.choices:
            return llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(choice) for choice in fmt.choices))
        schema = fmt.json_schema or '{"type": "object"}'
        if len(schema.encode()) > self.max_schema_bytes:
            raise TooLarge(f"response_format json_schema is {len(schema.encode())} bytes; the limit is "
                           f"{self.max_schema_bytes} (VLSPLIT_MAX_SCHEMA_BYTES)")
        # compact JSON: flexible whitespace would let a weak model pad an answer with blanks forever
        return llguidance.LLMatcher.grammar_from_json_schema(json.loads(schema),
                                                             overrides={"whitespace_flexible": False})


class GrammarMask:
    """The masks of one step's constrained rows, computed in parallel — and, when the engine says
    which rows will be sampled (`prefetch`), while the step's forward runs: llguidance releases the
    GIL, so the mask costs the step nothing but the masked_fill."""

    def __init__(self):
        self.executor = llguidance.LLExecutor()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        self._pending: tuple[list[int], Future] | None = None  # (ids of its matchers, bitmask being filled)

    def prefetch(self, matchers: list[llguidance.LLMatcher | None], vocab: int) -> None:
        """Start filling the next-token masks of these rows (the matchers' states must not change before
        `apply`); a later `apply` for the same matchers takes the result."""
        constrained = [m for m in matchers if m is not None]
        self._pending = None
        if constrained:
            self._pending = ([id(m) for m in constrained], self._thread.submit(self._fill, constrained, vocab))

    def _fill(self, matchers: list[llguidance.LLMatcher], vocab: int) -> np.ndarray:
        bitmask = llguidance.numpy.allocate_token_bitmask(len(matchers), vocab)  # [rows, vocab / 32] int32
        llguidance.numpy.fill_next_token_bitmask_par(self.executor, [(m, k) for k, m in enumerate(matchers)], bitmask)
        return bitmask

    def apply(self, logits: torch.Tensor, matchers: list[llguidance.LLMatcher | None]) -> torch.Tensor:
        """logits [R, vocab] -> the same with every token a row's grammar forbids at -inf."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return logits
        vocab = logits.shape[1]
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == [id(matchers[r]) for r in rows]:
            bitmask = pending[1].result()
        else:
            bitmask = self._fill([matchers[r] for r in rows], vocab)
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab]  # [rows, vocab] 0/1
        forbidden = torch.from_numpy(np.ascontiguousarray(bits)).view(torch.bool).logical_not().to(logits.device)
        out = logits.clone()  # the raw logits stay as they are (logprobs are reported from them)
        if len(rows) == logits.shape[0]:
            return out.masked_fill_(forbidden, float("-inf"))
        index = torch.tensor(rows, device=logits.device)
        out[index] = out[index].masked_fill(forbidden, float("-inf"))
        return out


class GrammarViolation(RuntimeError):
    """A token the grammar refuses reached its matcher although the mask forbade it: a bug of ours, never the
    client's (not a VlsplitError: the interceptor logs its traceback and answers INTERNAL)."""


def consume(matcher: llguidance.LLMatcher, token: int) -> None:
    """Advance `matcher` past the sampled token; a grammar that breaks fails its request (INTERNAL)."""
    if not matcher.consume_token(token) or matcher.is_error():
        raise GrammarViolation(f"token {token} left the response_format after masking: "
                               f"{matcher.get_error() or 'token refused'}")
