"""Zero-shot classification: score candidate answers by the model's log-likelihood.

The prompt is prefilled once (its image prefix possibly from the prefix cache); the first token of
every label is scored from the prompt's next-token distribution, and the rest of all multi-token
labels in one batched forward over forks of the prompt state. logprob(label) is the summed
log-probability of the label's tokens (no end-of-turn token); prob is the softmax over the labels'
logprobs, so the probabilities of the given labels sum to 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlsplit.shared.errors import InvalidRequest, TooLarge

from .engine import DecoderEngine, GenerationRequest
from .prefix_cache import fork

MAX_LABELS = 64
MAX_LABEL_TOKENS = 32


@dataclass(frozen=True)
class LabelScore:
    label: str
    logprob: float
    prob: float


@torch.inference_mode()
def classify(engine: DecoderEngine, request: GenerationRequest, labels: list[str]) -> list[LabelScore]:
    """Scores for `labels` as answers to `request`'s prompt, most likely first."""
    label_ids = _tokenize(engine, labels)
    prompt = engine.request_prompt(request)
    state, logits = engine.prefill(prompt, request.image_ids, request.warm)
    first = torch.log_softmax(logits, -1)  # [vocab]
    logprobs = [float(first[ids[0]]) for ids in label_ids]
    multi = [i for i, ids in enumerate(label_ids) if len(ids) > 1]
    if multi:
        rest = _continuations(engine, state, [label_ids[i] for i in multi])
        for i, extra in zip(multi, rest):
            logprobs[i] += extra
    probs = torch.softmax(torch.tensor(logprobs, dtype=torch.float64), 0).tolist()
    scores = [LabelScore(label, lp, p) for label, lp, p in zip(labels, logprobs, probs)]
    return sorted(scores, key=lambda s: s.logprob, reverse=True)


def _continuations(engine: DecoderEngine, state, label_ids: list[list[int]]) -> list[float]:
    """Summed logprobs of tokens 2..n of each label, all labels in one forward pass."""
    rows, width = len(label_ids), max(len(ids) for ids in label_ids) - 1
    inputs = torch.zeros(rows, width, dtype=torch.long)  # right padding: causal attention never sees it
    for row, ids in enumerate(label_ids):
        inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
    cache = fork(state.cache)
    cache.batch_repeat_interleave(rows)
    positions = (state.next_positions[:, None, None] + torch.arange(width)).expand(4, rows, width)
    mask = torch.ones(rows, cache.get_seq_length() + width, dtype=torch.long)
    embeds = engine.text_model.embed_tokens(inputs.to(engine.device))
    hidden = engine.hidden_states(embeds, positions.to(engine.device), cache, mask)
    logprobs = torch.log_softmax(engine.lm_head(hidden).float(), -1)  # [rows, width, vocab]
    return [float(sum(logprobs[row, k, ids[k + 1]] for k in range(len(ids) - 1)))
            for row, ids in enumerate(label_ids)]


def _tokenize(engine: DecoderEngine, labels: list[str]) -> list[list[int]]:
    if not labels:
        raise InvalidRequest("at least one label is required")
    if len(labels) > MAX_LABELS:
        raise TooLarge(f"{len(labels)} labels; the limit is {MAX_LABELS}")
    if len(set(labels)) != len(labels):
        raise InvalidRequest("labels must be distinct")
    out = []
    for label in labels:
        if not label.strip():
            raise InvalidRequest("labels must be non-empty")
        ids = engine.prompts.tokenizer(label, add_special_tokens=False)["input_ids"]
        if len(ids) > MAX_LABEL_TOKENS:
            raise TooLarge(f"label {label[:40]!r} is {len(ids)} tokens; the limit is {MAX_LABEL_TOKENS}")
        out.append(ids)
    return out
