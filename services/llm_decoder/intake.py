"""Intake: conversations and payloads in, a validated request out (the caller's thread).

Everything about a request that can be refused is refused here, before it reaches the scheduler:
image counts and payload checks (model, shapes, the image each payload names), sampling values,
labels, and every bound of EngineConfig (context, images, rows, checks, labels, stop strings, KV
blocks). Prompts are rendered with the checkpoint's chat template and their M-RoPE positions and
image spans computed; each sequence's full blocks are hashed for prefix reuse.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid

import torch
from cachetools import LRUCache

from shared.codec import validate_payload
from shared.config import EngineConfig
from shared.errors import CorruptPayload, InvalidRequest, ModelMismatch, TooLarge
from shared.payload import EmbeddingPayload, VideoTiming
from shared.processor import PromptBuilder, validate_messages
from shared.schema import Message, media_count

from .block_manager import BlockManager, Hash, root_hash
from .detokenizer import Detokenizer
from .grammar import GrammarCompiler, consume
from .positions import mrope_positions
from .request import ClassificationGroup, GenerationGroup, NeedPayload, SequenceGroup
from .sampling import Sampler, SamplingParams
from .sequence import ImageSpan, Prompt, Sequence

MAX_SALT_CHARS = 256  # a cache_salt (the gateway sends a 32-character hash of the tenant)
MAX_REMEMBERED_IMAGES = 100_000  # image_id -> grid entries kept for warm starts (a few MB)



def media_in(conversations: list[list[Message]], max_images: int) -> int:
    """The images and clips each conversation of a request holds (the same for all: they share them),
    within the VLSPLIT_MAX_IMAGES bound. Validates the messages first."""
    for conversation in conversations:
        validate_messages(conversation)
    counts = {media_count(c) for c in conversations}
    if len(counts) != 1:
        raise InvalidRequest("every conversation of a request must hold the same images and clips")
    images = counts.pop()
    if images > max_images:
        raise TooLarge(f"the messages hold {images} images and clips; the limit is {max_images} (VLSPLIT_MAX_IMAGES)")
    return images


class Intake:
    def __init__(self, config: EngineConfig, prompts: PromptBuilder, blocks: BlockManager, root: Hash,
                 fingerprint: str, hidden_size: int, deepstack_levels: int, eos_ids: frozenset[int], max_len: int,
                 device: torch.device, dtype: torch.dtype, grammars: GrammarCompiler, tokens_per_second: float = 0.0):
        self.config, self.prompts, self.blocks, self.root = config, prompts, blocks, root
        self.fingerprint, self.hidden_size, self.deepstack_levels = fingerprint, hidden_size, deepstack_levels
        self.eos_ids, self.max_len, self.device, self.dtype = eos_ids, max_len, device, dtype
        self.grammars = grammars
        self.merge_size = prompts.merge_size
        self.vision_end_id = prompts.tokenizer.convert_tokens_to_ids("<|vision_end|>")
        # Qwen2.5-VL: a clip's temporal positions are tokens_per_second * second_per_grid_t apart
        self.tokens_per_second = tokens_per_second
        # image (or clip) id -> (grid, clip timing), for warm starts
        self.image_grids: LRUCache[str, tuple[tuple[int, int, int], VideoTiming | None]] = LRUCache(
            maxsize=MAX_REMEMBERED_IMAGES)

    @property
    def request_block_limit(self) -> int:
        return min(self.config.max_request_blocks or self.blocks.num_blocks, self.blocks.num_blocks)

    def prepare(self, conversations: list[list[Message]], payloads: list[EmbeddingPayload] | None,
                sampling: SamplingParams | list[SamplingParams] = SamplingParams(),
                image_ids: tuple[str, ...] = (), labels: list[list[str]] | None = None,
                resume: tuple[int, ...] = (), cache_salt: str = "") -> SequenceGroup:
        """A validated request. Without payloads (None, or none with image ids) the images' KV must
        be cached, else NeedPayload. `resume`: one conversation's first answer tokens, produced by
        another replica: prefilled after the prompt, counted in max_new_tokens, primed into the
        detokenizer (its text was delivered already). `cache_salt`: the prefix cache's partition (a
        tenant): its blocks chain from a root of their own, so requests of other salts share none."""
        if len(cache_salt) > MAX_SALT_CHARS:
            raise TooLarge(f"cache_salt is {len(cache_salt)} characters; the limit is {MAX_SALT_CHARS}")
        root = root_hash(self.root, cache_salt) if cache_salt else self.root
        if not payloads and image_ids:
            payloads = None
        kind = "check" if labels is not None else "conversation"
        limit = self.config.max_checks if labels is not None else self.config.max_rows
        if not conversations:
            raise InvalidRequest(f"at least one {kind} is required")
        if len(conversations) > limit:
            raise TooLarge(f"{len(conversations)} {kind}s in one request; the limit is {limit} "
                           f"({'VLSPLIT_MAX_CHECKS' if labels is not None else 'VLSPLIT_MAX_ROWS'})")
        images = media_in(conversations, self.config.max_images)
        # what needs no image is checked before any payload is asked for
        if labels is not None:
            if len(labels) != len(conversations):
                raise InvalidRequest(f"{len(conversations)} checks but {len(labels)} label lists")
            label_ids = [self._tokenize_labels(check) for check in labels]
        else:
            params = sampling if isinstance(sampling, list) else [sampling] * len(conversations)
            params = [self._validate_sampling(p) for p in params]
            resumes = _per_conversation(resume, len(conversations))
            params = [self._check_resume(r, p) if r else p for r, p in zip(resumes, params)]
        grids, videos, keys, embeddings, deepstack = self._images(images, payloads, image_ids)
        prompts = [self._prompt(c, grids, videos, keys, embeddings, deepstack) for c in conversations]
        if labels is not None:
            request = self._classify_request(prompts, labels, label_ids, root)
        else:
            prompts = [_resumed(p, r) if r else p for p, r in zip(prompts, resumes)]
            request = self._generate_request(prompts, params, root, resumes)
        self._check_blocks(request)
        if payloads is None:
            self._check_cached(request)
        return request

    def _images(self, images: int, payloads: list[EmbeddingPayload] | None, image_ids: tuple[str, ...]):
        """(grids, clip timings, keys, embeddings, deepstack) of the request's images and clips, from
        payloads or remembered grids."""
        if image_ids and len(image_ids) != images:
            raise InvalidRequest(f"the messages hold {images} images but {len(image_ids)} image ids were given")
        if payloads is None:
            known = [self.image_grids.get(i) for i in image_ids]
            if len(known) != images or None in known:
                raise NeedPayload("the images' grids are unknown to this decoder")
            return [k[0] for k in known], [k[1] for k in known], list(image_ids), None, ()
        if len(payloads) != images:
            raise InvalidRequest(f"the messages hold {images} images but {len(payloads)} payloads were given")
        keys = []
        for i, payload in enumerate(payloads):
            self.check_payload(payload)
            claimed = image_ids[i] if image_ids else ""
            if claimed and payload.image_id and payload.image_id != claimed:
                raise InvalidRequest(f"payload {i} is for image {payload.image_id}, but it was sent for image {claimed}")
            key = payload.image_id or claimed
            keys.append(key or f"unnamed:{uuid.uuid4()}")  # an unnamed image is never reused
            if key:
                self._remember(key, payload.grid_thw, payload.video)
        if not payloads:
            return [], [], [], None, ()
        embeddings = torch.cat([p.embeddings for p in payloads]).to(self.device, self.dtype)
        deepstack = tuple(torch.cat([p.deepstack[level] for p in payloads]).to(self.device, self.dtype)
                          for level in range(self.deepstack_levels))
        return [p.grid_thw for p in payloads], [p.video for p in payloads], keys, embeddings, deepstack

    def check_payload(self, payload: EmbeddingPayload) -> None:
        if payload.fingerprint != self.fingerprint:
            raise ModelMismatch(
                f"embeddings were made by model {payload.fingerprint}, this decoder serves {self.fingerprint}"
            )
        # grid divisible by the merge size, n_tokens matching it, hidden size, deepstack shapes
        validate_payload(payload, self.merge_size, self.hidden_size)
        if len(payload.deepstack) != self.deepstack_levels:
            raise CorruptPayload(f"payload has {len(payload.deepstack)} deepstack levels, model needs {self.deepstack_levels}")

    def _remember(self, image_id: str, grid: tuple[int, int, int], video: VideoTiming | None) -> None:
        self.image_grids[image_id] = (tuple(grid), video)  # the least recently used go past the bound

    def _prompt(self, messages: list[Message], grids, videos, keys, embeddings, deepstack) -> Prompt:
        inputs = self.prompts(messages, grids, videos)
        ids = inputs.input_ids.tolist()  # a list: indexed per token below
        runs, intervals, run_keys = [], [], []
        for grid, video, key in zip(grids, videos, keys):
            # the grid (and a clip's timing) is part of an item's key: its M-RoPE positions depend on it
            base = f"{key}/{'x'.join(map(str, grid))}" + ("" if video is None else f"/{_timing_key(video)}")
            item_runs = self.prompts.media_runs(grid, video)
            interval = self._interval(video)
            for i, run in enumerate(item_runs):
                runs.append(run)
                intervals.append(interval)
                run_keys.append(base if len(item_runs) == 1 else f"{base}#{i}")
        positions, _ = mrope_positions(inputs.mm_token_type_ids, runs, self.merge_size, intervals)
        mm = inputs.mm_token_type_ids.tolist()
        starts = [i for i in range(len(ids)) if mm[i] and (i == 0 or not mm[i - 1])]
        spans, row = [], 0
        for start, run, key in zip(starts, runs, run_keys):
            length = self.prompts.tokens_per_image(run)
            spans.append(ImageSpan(start, length, key, row))
            row += length
        end = spans[-1].start + spans[-1].length if spans else 0
        cache_point = end + 1 if spans and end < len(ids) and ids[end] == self.vision_end_id else end
        return Prompt(ids, positions, int(positions[:, -1].max()) + 1, tuple(spans), embeddings, tuple(deepstack),
                      cache_point)

    def _interval(self, video: VideoTiming | None):
        """A run's temporal spacing: Qwen2.5-VL's clips, tokens_per_second * second_per_grid_t in float32
        (as transformers computes it from the processor's tensor); 1 otherwise."""
        if video is None or self.prompts.video_prompt != "seconds":
            return 1.0
        return self.tokens_per_second * torch.tensor(video.second_per_grid_t, dtype=torch.float32)

    def _sequence(self, prompt: Prompt, root: Hash, index: int, max_new_tokens: int, worst: int) -> Sequence:
        return Sequence(prompt, root, self.config.block_size, max_new_tokens, index=index, worst=worst)

    def _generate_request(self, prompts: list[Prompt], params: list[SamplingParams], root: Hash,
                          resumes: list[tuple[int, ...]]) -> GenerationGroup:
        seqs = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            self._check_length(len(prompt), p.max_new_tokens, "max_new_tokens")
            worst = -(-(len(prompt) + p.max_new_tokens) // self.config.block_size)
            seqs.append(self._sequence(prompt, root, i, p.max_new_tokens, worst))
        tokenizer = self.prompts.tokenizer.backend_tokenizer
        detokenizers = [Detokenizer(tokenizer, p.stop) for p in params]
        samplers = [Sampler(p, self.device, self._matcher(p)) for p in params]
        for detokenizer, sampler, resume in zip(detokenizers, samplers, resumes):
            for token_id in resume:  # text the failed replica delivered: the stream state, not output
                detokenizer.add(token_id)
                if sampler.matcher is not None:  # the grammar continues where the answer stands
                    consume(sampler.matcher, token_id)
        return GenerationGroup(seqs, samplers, detokenizers, self.eos_ids, self.max_len)

    def check_sampling(self, params: SamplingParams) -> None:
        self._matcher(self._validate_sampling(params))

    def _matcher(self, params: SamplingParams):
        """The grammar matcher of a response format (each row its own: they advance separately)."""
        if not params.response_format:
            return None
        if len(params.response_format.choices) > self.config.max_labels:
            raise TooLarge(f"{len(params.response_format.choices)} response_format choices; the limit is "
                           f"{self.config.max_labels} (VLSPLIT_MAX_LABELS)")
        return self.grammars.matcher(params.response_format)

    def _check_resume(self, resume: tuple[int, ...], p: SamplingParams) -> SamplingParams:
        """The sampling of the tokens still to generate after `resume`."""
        if len(resume) >= p.max_new_tokens:
            raise InvalidRequest(f"{len(resume)} tokens to resume from, but max_new_tokens is {p.max_new_tokens}")
        vocab = len(self.prompts.tokenizer)
        if any(not 0 <= t < vocab for t in resume) or set(resume) & self.eos_ids:
            raise InvalidRequest(f"resume_token_ids must be tokens of the vocabulary (< {vocab}) and not end the answer")
        return dataclasses.replace(p, max_new_tokens=p.max_new_tokens - len(resume))

    def _classify_request(self, prompts: list[Prompt], labels: list[list[str]],
                          label_ids: list[list[list[int]]], root: Hash) -> ClassificationGroup:
        bs, seqs = self.config.block_size, []
        for i, (prompt, ids) in enumerate(zip(prompts, label_ids)):
            self._check_length(len(prompt), max(len(x) for x in ids), "the longest label")
            rows = sum(-(-(len(prompt) + len(x) - 1) // bs) - len(prompt) // bs for x in ids if len(x) > 1)
            seqs.append(self._sequence(prompt, root, i, 0, -(-len(prompt) // bs) + rows))
        return ClassificationGroup(seqs, [(list(check), ids) for check, ids in zip(labels, label_ids)])

    def _tokenize_labels(self, labels: list[str]) -> list[list[int]]:
        if not labels:
            raise InvalidRequest("at least one label is required")
        if len(labels) > self.config.max_labels:
            raise TooLarge(f"{len(labels)} labels; the limit is {self.config.max_labels} (VLSPLIT_MAX_LABELS)")
        if len(set(labels)) != len(labels):
            raise InvalidRequest("labels must be distinct")
        out = []
        for label in labels:
            if not isinstance(label, str) or not label.strip():
                raise InvalidRequest("labels must be non-empty")
            ids = self.prompts.plain_ids(label)  # a label is user text: never special tokens
            if len(ids) > self.config.max_label_tokens:
                raise TooLarge(f"label {label[:40]!r} is {len(ids)} tokens; the limit is "
                               f"{self.config.max_label_tokens} (VLSPLIT_MAX_LABEL_TOKENS)")
            out.append(ids)
        return out

    def _validate_sampling(self, params: SamplingParams) -> SamplingParams:
        params = params.validate(self.config.max_new_tokens_limit)
        if len(params.stop) > self.config.max_stop:
            raise TooLarge(f"{len(params.stop)} stop strings; the limit is {self.config.max_stop} (VLSPLIT_MAX_STOP)")
        for stop in params.stop:
            if len(stop) > self.config.max_stop_chars:
                raise TooLarge(f"a stop string is {len(stop)} characters; the limit is "
                               f"{self.config.max_stop_chars} (VLSPLIT_MAX_STOP_CHARS)")
        return params

    def _check_length(self, prompt_tokens: int, new_tokens: int, what: str) -> None:
        if prompt_tokens + new_tokens > self.max_len:
            raise TooLarge(f"the prompt is {prompt_tokens} tokens and {what} adds up to {new_tokens}: over the "
                           f"context limit of {self.max_len} tokens (max_model_len)")

    def _check_blocks(self, request: SequenceGroup) -> None:
        """A request that could never fit in the pool is refused now (it would wait forever)."""
        bs = self.config.block_size
        shared = _common_prefix([s.prompt.ids for s in request.seqs]) // bs
        need = shared + sum(s.worst - shared for s in request.seqs)
        limit = self.request_block_limit
        if need > limit:
            raise TooLarge(f"the request needs up to {need} KV blocks ({need * bs} tokens); the limit is {limit} "
                           f"blocks ({'the whole KV pool, VLSPLIT_KV_CACHE_BYTES' if limit == self.blocks.num_blocks else 'VLSPLIT_MAX_REQUEST_BLOCKS'})")

    def _check_cached(self, request: SequenceGroup) -> None:
        """Without payloads, every image token must lie in cached blocks (a warm start)."""
        for seq in request.seqs:
            prompt = seq.prompt
            match = self.blocks.match(seq, len(prompt), limit=len(prompt) - 1)
            if match.tokens < prompt.image_end:
                raise NeedPayload(f"the KV of the images is not cached ({match.tokens} of {prompt.image_end} tokens)")


def _timing_key(video: VideoTiming) -> str:
    """A clip's timing as part of its KV key (its positions or its prompt text depend on it)."""
    text = repr((video.second_per_grid_t, video.timestamps)).encode()
    return hashlib.blake2b(text, digest_size=8).hexdigest()


def _per_conversation(resume: tuple, conversations: int) -> list[tuple[int, ...]]:
    """`resume` as one token tuple per conversation: one conversation's tokens, or one tuple for each."""
    if not resume:
        return [()] * conversations
    if isinstance(resume[0], int):
        if conversations != 1:
            raise InvalidRequest("resume_token_ids continue one conversation")
        return [tuple(resume)]
    if len(resume) != conversations:
        raise InvalidRequest(f"{len(resume)} resumed answers for {conversations} conversations")
    return [tuple(r) for r in resume]


def _resumed(prompt: Prompt, resume: tuple[int, ...]) -> Prompt:
    """`prompt` followed by the answer tokens to resume from (text: one position per token, all axes)."""
    n = len(resume)
    tail = torch.arange(prompt.next_position, prompt.next_position + n, dtype=prompt.positions.dtype)
    positions = torch.cat([prompt.positions, tail.expand(3, n)], dim=1)
    return dataclasses.replace(prompt, ids=prompt.ids + list(resume), positions=positions,
                               next_position=prompt.next_position + n)


def _common_prefix(lists: list[list[int]]) -> int:
    first, n = lists[0], len(lists[0])
    for other in lists[1:]:
        n = min(n, len(other))
        for i in range(n):
            if other[i] != first[i]:
                n = i
                break
    return n
