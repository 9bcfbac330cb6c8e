"""The scheduler: which sequences a step advances, and by how many tokens.

Policy, every step:
1. Drop every sequence of a cancelled request, wherever it is (waiting: never prefilled).
2. Decode first: each running sequence with one token pending gets it.
3. Prefill with what is left of the step's token budget, oldest first, in chunks (a 16k-token
   image prompt takes several steps, and running streams get a token in each). A chunk never
   crosses a prompt's cache point (the end of its last image), so the prefix state there is the
   same whether it was computed or reused.
4. Admit waiting sequences, oldest first, while rows and the budget allow and their worst-case
   blocks can be promised; the first that cannot be promised stops admission (first come, first
   served: a large request is never starved by small ones behind it). A sequence whose image prefix
   another sequence is computing right now waits for it, then reuses its blocks (64 questions about
   a new image compute it once); the request holds the blocks its first admitted row reused until
   its last row is admitted, so its other rows find them too.
Nothing is ever preempted: an admitted sequence's blocks are promised up front.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from shared.errors import Overloaded

from .block_manager import BlockManager, Hash
from .metrics import DROPPED, HIT_TOKENS, MISS_TOKENS, PREFILL_TOKENS, QUEUE_DEPTH, RUNNING
from .model_runner import Chunk
from .request import NeedPayload, SequenceGroup
from .sequence import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int  # sequences running at once (a step advances at most this many)
    max_step_tokens: int  # tokens one step computes: decode tokens plus prefill chunks
    max_queue: int  # requests waiting for admission; one more gets RESOURCE_EXHAUSTED


class Scheduler:
    def __init__(self, blocks: BlockManager, config: SchedulerConfig):
        self.blocks, self.config = blocks, config
        self.block_size = blocks.block_size
        self.inbox: list[SequenceGroup] = []
        self.queued = 0  # requests with a sequence not admitted yet
        self.waiting: deque[Sequence] = deque()
        self.forked: deque[Sequence] = deque()  # label rows: blocks already held, waiting for a row
        self.running: list[Sequence] = []
        self.computing: dict[Hash, Sequence] = {}  # cache key -> the sequence computing that prefix
        self.changed = threading.Condition()
        self.version = 0  # bumped by every add and wake: the engine loop sleeps until it changes
        self.prefilled = 0  # prompt tokens computed (not reused), for tests and benchmarks
        self.blocked = 0  # admissions put off because the pool could not promise the blocks
        self.dropped: dict[str, int] = {"waiting": 0, "running": 0, "forked": 0}  # sequences of cancelled requests

    # ---- from any thread ----------------------------------------------------------------------

    def add(self, request: SequenceGroup) -> None:
        with self.changed:
            if self.queued >= self.config.max_queue:
                raise Overloaded(f"decoder queue full: {self.queued} requests wait for KV blocks or rows "
                                 f"(limit VLSPLIT_MAX_QUEUE={self.config.max_queue}); retry with backoff")
            self.queued += 1
            QUEUE_DEPTH.set(self.queued)
            request.unadmitted = len(request.seqs)
            self.inbox.append(request)
            self.version += 1
            self.changed.notify()

    def wake(self) -> None:
        """A request was cancelled (or the engine closes): let the loop look again."""
        with self.changed:
            self.version += 1
            self.changed.notify()

    def wait_for_change(self, seen: int, timeout: float) -> None:
        """Sleep until something was added or woken since `seen` (or `timeout` passed)."""
        with self.changed:
            self.changed.wait_for(lambda: self.version != seen, timeout)

    def has_work(self) -> bool:
        return bool(self.inbox or self.waiting or self.forked or self.running)

    # ---- from the engine's thread ---------------------------------------------------------------

    def schedule(self) -> list[Chunk]:
        with self.changed:
            new, self.inbox = self.inbox, []
        for request in new:
            self.waiting.extend(request.seqs)
        self._drop_cancelled()
        budget = self.config.max_step_tokens
        chunks: list[Chunk] = []
        for seq in sorted(self.running, key=lambda s: s.pending > 1):  # decode rows first, stable otherwise
            n = self._chunk(seq, budget)
            if n:
                chunks.append(Chunk(seq, seq.computed, n))
                budget -= n
        while self.forked and len(self.running) < self.config.max_batch and budget > 0:
            seq = self.forked.popleft()
            self._run(seq)
            n = self._chunk(seq, budget)
            if n:
                chunks.append(Chunk(seq, seq.computed, n))
                budget -= n
        for seq in list(self.waiting):
            if len(self.running) >= self.config.max_batch or budget <= 0:
                break
            if seq.status is not Status.WAITING:  # dropped meanwhile (its request was aborted)
                continue
            admitted = self._admit(seq)
            if admitted is None:
                break  # the pool cannot promise its blocks now: nobody behind it goes first
            if admitted and (n := self._chunk(seq, budget)):
                chunks.append(Chunk(seq, seq.computed, n))
                budget -= n
        chunks = [c for c in chunks if c.seq.status is Status.RUNNING]  # an abort may have dropped some
        for chunk in chunks:
            self._allocate(chunk.seq, chunk.end)
        return chunks

    def computed(self, chunk: Chunk) -> None:
        """The step computed `chunk`: cache its full blocks, and a copy of the block at its cache point."""
        seq, bs = chunk.seq, self.block_size
        before, seq.computed = seq.computed, chunk.end
        if chunk.end <= len(seq.prompt):
            self.prefilled += chunk.n
            MISS_TOKENS.inc(chunk.n)
            PREFILL_TOKENS.inc(chunk.n)
        for b in range(before // bs, seq.computed // bs):
            self._register(seq, b, bs)
        point = seq.prompt.cache_point
        if before < point <= seq.computed:
            if point % bs:
                b = point // bs
                self.blocks.snapshot(seq.block_table[b], seq.parent_hash(b), seq.content(b * bs, point))
            if self.computing.get(seq.cache_key) is seq:
                del self.computing[seq.cache_key]

    def _register(self, seq: Sequence, b: int, n: int) -> None:
        """Cache the first `n` tokens of the sequence's block `b` (all of them: a full block)."""
        start = b * self.block_size
        self.blocks.register(seq.block_table[b], seq.parent_hash(b), seq.content(start, start + n),
                             seq.hashes[b] if n == self.block_size else None)

    def fork(self, parent: Sequence, tokens: list[int], label: int) -> Sequence:
        """A row continuing `parent` with `tokens`: its full blocks shared, its last partial block copied."""
        bs = self.block_size
        child = Sequence(parent.prompt, parent.root, bs, 0, index=parent.index, label=label, logits="all",
                         tokens=parent.tokens + tokens, hashes=list(parent.hashes), computed=parent.computed,
                         request=parent.request)
        full = parent.computed // bs
        child.block_table = parent.block_table[:full]
        self.blocks.acquire(child.block_table)
        child.promise = child.blocks_for(len(child)) - full
        parent.promise -= child.promise  # promised with the parent at its admission
        if parent.computed % bs:
            child.block_table.append(self.blocks.copy(parent.block_table[full]))
            self._spend(child)
        parent.request.open += 1
        self.forked.append(child)
        return child

    def finish(self, seq: Sequence) -> None:
        """The sequence is done: cache its last partial block, release its blocks and promise."""
        if seq.computed % self.block_size and seq.block_table:
            self._register(seq, seq.computed // self.block_size, seq.computed % self.block_size)
        self._free(seq)
        seq.request.sequence_done()

    def abort(self, request: SequenceGroup, exc: BaseException) -> None:
        """End a request with an error: its client gets `exc`, every sequence of it is dropped."""
        request.fail(exc)
        request.cancel()
        self._drop_cancelled()

    def abort_all(self, exc: BaseException) -> None:
        """End every request the scheduler holds with `exc` (the engine hit a bug it cannot place)."""
        with self.changed:
            new, self.inbox = self.inbox, []
        self.waiting.extend(seq for request in new for seq in request.seqs)
        requests = {id(s.request): s.request for s in [*self.waiting, *self.forked, *self.running]}
        for request in requests.values():
            request.fail(exc)
            request.cancel()
        self._drop_cancelled()

    # ---- internals ------------------------------------------------------------------------------

    def _chunk(self, seq: Sequence, budget: int) -> int:
        if seq.logits == "all":  # a label row is scored from all its positions at once: never split
            fits = seq.pending <= budget or seq.pending > self.config.max_step_tokens
            return seq.pending if fits else 0  # (one longer than any step runs whole, over the budget)
        n = min(seq.pending, budget)
        point = seq.prompt.cache_point
        if seq.computed < point < seq.computed + n:
            n = point - seq.computed
        return max(n, 0)

    def _admit(self, seq: Sequence) -> bool | None:
        """Admit `seq`: True; False: it waits for a prefix being computed (or its request was
        aborted); None: the pool cannot promise its blocks now."""
        key = seq.cache_key
        if key is not None and key in self.computing:
            return False  # another sequence is computing this image prefix: reuse it next
        prompt, request = seq.prompt, seq.request
        match = self.blocks.match(seq, len(prompt), limit=len(prompt) - 1)
        need = seq.worst - len(match.blocks)
        newly = sum(self.blocks.blocks[b].ref == 0 for b in match.blocks)  # cached blocks it takes out of the LRU
        if not self.blocks.can_promise(need + newly):
            self.blocked += 1
            return None
        if match.tail is not None and self.blocks.blocks[match.tail].ref == 0 and not self.blocks.can_promise(
                need + newly + 1):  # copying the tail (and holding it for the request) needs one more block
            if prompt.embeddings is None and match.tokens - match.tail_tokens < prompt.image_end:
                self.blocked += 1
                return None  # without a payload the tail cannot be recomputed: wait for room
            match.tokens, match.tail, match.tail_tokens = match.tokens - match.tail_tokens, None, 0
        if prompt.embeddings is None and match.tokens < prompt.image_end:
            # no row of this request was admitted yet (they would hold the blocks): nothing was sent
            self.abort(request, NeedPayload("the images' cached KV was evicted before admission"))
            return False
        self.blocks.acquire(match.blocks)
        if request.unadmitted > 1 and not request.held and match.tokens:
            request.held = match.blocks + ([match.tail] if match.tail is not None else [])
            self.blocks.acquire(request.held)
        seq.block_table, seq.computed = list(match.blocks), len(match.blocks) * self.block_size
        seq.promise = need
        self.blocks.promise(need)
        if match.tail is not None:
            seq.block_table.append(self.blocks.copy(match.tail))
            self._spend(seq)
            seq.computed += match.tail_tokens
        HIT_TOKENS.inc(seq.computed)
        if key is not None and seq.computed < prompt.cache_point:
            self.computing.setdefault(key, seq)
        self.waiting.remove(seq)
        self._run(seq)
        self._left_queue(request)
        return True

    def _left_queue(self, request: SequenceGroup) -> None:
        request.unadmitted -= 1
        if request.unadmitted == 0:
            self.queued -= 1
            QUEUE_DEPTH.set(self.queued)
            self.blocks.release(request.held)
            request.held = []

    def _run(self, seq: Sequence) -> None:
        seq.status = Status.RUNNING
        self.running.append(seq)
        RUNNING.set(len(self.running))

    def _allocate(self, seq: Sequence, end: int) -> None:
        while len(seq.block_table) * self.block_size < end:
            seq.block_table.append(self.blocks.allocate())
            self._spend(seq)

    def _spend(self, seq: Sequence) -> None:
        """One of the sequence's promised blocks is now allocated."""
        seq.promise -= 1
        self.blocks.promise(-1)

    def _free(self, seq: Sequence) -> None:
        if seq.status is Status.FINISHED:
            return
        self.blocks.release(seq.block_table)
        seq.block_table = []
        self.blocks.promise(-seq.promise)
        seq.promise = 0
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
            RUNNING.set(len(self.running))
        if self.computing.get(seq.cache_key) is seq:
            del self.computing[seq.cache_key]

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.waiting if s.request.cancelled]:
            self.waiting.remove(seq)
            self._left_queue(seq.request)
            seq.status = Status.FINISHED
            self.dropped["waiting"] += 1
            DROPPED.labels("waiting").inc()
        for queue_name, seqs in (("running", self.running), ("forked", self.forked)):
            for seq in [s for s in seqs if s.request.cancelled]:
                if queue_name == "forked":
                    self.forked.remove(seq)
                self._free(seq)
                self.dropped[queue_name] += 1
                DROPPED.labels(queue_name).inc()
