"""Requests: what one client call asked for, as sequences for the scheduler and outputs for a sink.

A request owns its sequences (one per conversation, or per Classify check, plus label rows forked
from a check's prompt) and turns what the engine computes for them into outputs, each handed to
its `sink` from the engine's thread: `(index, TokenEvent)` for generation, `(index, [LabelScore])`
for Classify, then `END`; or one exception, then nothing. `cancel()` may be called from any thread:
the engine drops the request at its next step, wherever its sequences are.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import torch

from .detokenizer import Detokenizer
from .grammar import consume
from .sampling import Logprobs, Sampler
from .sequence import Sequence

END = object()  # the request has delivered all its outputs


class NeedPayload(Exception):
    """The request came without embeddings, and the KV of its images is not (or no longer) cached."""
Sink = Callable[[object], None]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # image tokens included
    image_tokens: int
    completion_tokens: int  # generated, the final EOS not counted


@dataclass(frozen=True)
class TokenEvent:
    """One step of a streamed generation. The last event has `finish_reason` and `usage` set."""

    token_id: int | None  # None on a final event that adds no token (EOS)
    text: str  # text delta, "" while held back
    finish_reason: str | None = None  # "stop" (EOS or stop string) | "length"
    usage: Usage | None = None
    logprobs: Logprobs | None = None  # of token_id, when the request asked for logprobs


@dataclass(frozen=True)
class LabelScore:
    label: str
    logprob: float  # summed log-probability of the label's tokens as the answer
    prob: float  # softmax of the logprobs over the check's labels


class SequenceGroup:
    def __init__(self, seqs: list[Sequence]):
        self.seqs = seqs
        for seq in seqs:
            seq.request = self
        self.sink: Sink | None = None
        self.open = len(seqs)  # sequences not finished
        self.unadmitted = len(seqs)  # sequences not admitted yet
        self.held: list[int] = []  # blocks its first admitted row reused, kept for its other rows
        self._cancelled = threading.Event()
        self.failed = False

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, item: object) -> None:
        if self.sink is not None:
            self.sink(item)

    def fail(self, exc: BaseException) -> None:
        if not self.failed:
            self.failed = True
            self.emit(exc)

    def sequence_done(self) -> None:
        self.open -= 1
        if self.open == 0 and not self.failed:
            self.emit(END)


class GenerationGroup(SequenceGroup):
    """Conversations to answer (one, or a batch about the same images), each streamed token by token."""

    def __init__(self, seqs: list[Sequence], samplers: list[Sampler], detoks: list[Detokenizer], eos: frozenset[int],
                 max_len: int):
        super().__init__(seqs)
        self.samplers, self.detoks, self.eos, self.max_len = samplers, detoks, eos, max_len

    def on_token(self, seq: Sequence, token: int, logprobs: Logprobs | None = None) -> bool:
        """Take the token sampled for `seq`; emit its event; True when the sequence is finished."""
        detok = self.detoks[seq.index]
        if token in self.eos:
            return self._finish(seq, TokenEvent(None, detok.flush(), "stop", self._usage(seq)))
        matcher = self.samplers[seq.index].matcher
        if matcher is not None:
            consume(matcher, token)
        seq.append(token)
        delta = detok.add(token)
        if detok.stopped:
            return self._finish(seq, TokenEvent(token, delta, "stop", self._usage(seq), logprobs))
        if seq.generated == seq.max_new_tokens or len(seq) >= self.max_len:
            return self._finish(seq, TokenEvent(token, delta + detok.flush(), "length", self._usage(seq), logprobs))
        self.emit((seq.index, TokenEvent(token, delta, logprobs=logprobs)))
        return False

    def _finish(self, seq: Sequence, event: TokenEvent) -> bool:
        self.emit((seq.index, event))
        return True

    @staticmethod
    def _usage(seq: Sequence) -> Usage:
        return Usage(len(seq.prompt), seq.prompt.image_tokens, seq.generated)


@dataclass
class _Check:
    labels: list[str]
    label_ids: list[list[int]]
    logprobs: list[float] | None = None
    waiting: int = 0  # label rows still to score


class ClassificationGroup(SequenceGroup):
    """Checks (a prompt and its candidate labels) scored by log-likelihood.

    A check's prompt is one sequence (prefill only); the first token of every label is scored from
    its last logits. Each label of several tokens then becomes a row forked from the prompt (sharing
    its blocks), prefilled with the label's tokens but the last, scored from all its positions.
    """

    def __init__(self, seqs: list[Sequence], checks: list[tuple[list[str], list[list[int]]]]):
        super().__init__(seqs)
        self.checks = [_Check(labels, ids) for labels, ids in checks]

    def on_prompt(self, seq: Sequence, logits: torch.Tensor) -> list[tuple[int, list[int]]]:
        """A check's prompt is prefilled: score first tokens; return the label rows to fork as
        (label index, the tokens the row feeds)."""
        check = self.checks[seq.index]
        first = torch.log_softmax(logits, -1)
        check.logprobs = first[torch.tensor([ids[0] for ids in check.label_ids], device=logits.device)].tolist()
        rows = [(i, ids[:-1]) for i, ids in enumerate(check.label_ids) if len(ids) > 1]
        check.waiting = len(rows)
        if not rows:
            self._scored(seq.index)
        return rows

    def on_label(self, seq: Sequence, logits: torch.Tensor) -> None:
        """A label row is prefilled: add its tokens 2..n to the label's logprob."""
        check = self.checks[seq.index]
        ids = check.label_ids[seq.label]
        logprobs = torch.log_softmax(logits, -1)  # [n - 1, vocab]: position k predicts token k + 1
        target = torch.tensor(ids[1:], device=logits.device)
        check.logprobs[seq.label] += float(logprobs.gather(1, target[:, None]).sum())
        check.waiting -= 1
        if check.waiting == 0:
            self._scored(seq.index)

    def _scored(self, index: int) -> None:
        check = self.checks[index]
        probs = torch.softmax(torch.tensor(check.logprobs, dtype=torch.float64), 0).tolist()
        scores = [LabelScore(label, lp, p) for label, lp, p in zip(check.labels, check.logprobs, probs)]
        self.emit((index, sorted(scores, key=lambda s: s.logprob, reverse=True)))
