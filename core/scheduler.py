"""Continuous batching under a token budget.

Each step: running sequences that are decoding get one token each, then running
sequences part-way through a chunked prefill continue, then waiting sequences are
admitted oldest first while the token budget, `max_num_seqs` and free blocks allow.
When a running sequence cannot get a block, the youngest running sequence is preempted
by recompute: its blocks are freed and it goes back to the front of the queue (or, on a
decode worker, is handed back to the caller to be sent to the prefill pool).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tandem.core.config import SchedulerConfig
from tandem.core.kv_cache_manager import KVCacheManager, blocks_needed
from tandem.core.sequence import FinishReason, Sequence, SequenceStatus, check_stop


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # first token position run this step
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence, so a token is sampled."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def __bool__(self) -> bool:
        return bool(self.chunks)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        eos_token_ids: frozenset[int] = frozenset(),
        requeue_preempted: bool = True,
    ) -> None:
        self.config = config
        self.kv = kv
        self.eos_token_ids = eos_token_ids
        # A decode worker cannot prefill, so it hands preempted sequences back instead.
        self.requeue_preempted = requeue_preempted
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # -- admission -------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a sequence that still needs (part of) its prefill."""
        self._check_fits(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Join a sequence whose KV is already in blocks owned under its request id."""
        self._check_fits(seq)
        if not self.kv.allocate_slots(seq.request_id, seq.num_computed_tokens):
            raise MemoryError("add_running needs blocks reserved for the computed tokens")
        self.kv.cache_full_blocks(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _check_fits(self, seq: Sequence) -> None:
        worst = len(seq.prompt_token_ids) + seq.sampling.max_tokens
        if worst > self.config.max_model_len:
            raise ValueError(
                f"sequence needs {worst} tokens, max_model_len is {self.config.max_model_len}"
            )
        if blocks_needed(worst, self.kv.block_size) > self.kv.pool.num_blocks:
            raise ValueError("sequence can never fit in the KV cache")

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def room(self) -> int:
        """How many more sequences fit now (a worker taking tasks from a shared queue
        takes no more, leaving the rest to its peers): free sequence slots, and free
        blocks beyond what the sequences in hand still need for the rest of their
        prompts and one token more, a new one needing at least one. None while a
        step's token budget of prompts is already waiting."""
        waiting_tokens = sum(s.num_uncomputed_tokens for s in self.waiting)
        if waiting_tokens >= self.config.prefill_budget:
            return 0
        slots = self.config.max_num_seqs - len(self.running) - len(self.waiting)
        return max(0, min(slots, self.spare_blocks()))

    def spare_blocks(self) -> int:
        """Free blocks beyond what the sequences in hand still need for the rest of
        their prompts and one token more (negative when they are short)."""
        promised = sum(
            blocks_needed(s.num_tokens + 1, self.kv.block_size)
            - len(self.kv.block_table(s.request_id))
            for s in (*self.running, *self.waiting)
        )
        return self.kv.num_free_blocks - promised

    def get(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                return seq
        return None

    # -- leaving -----------------------------------------------------------------------
    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Remove a sequence wherever it is and free its blocks."""
        self.detach(seq)
        seq.finish_reason = reason
        self.kv.free(seq.request_id)

    def detach(self, seq: Sequence) -> None:
        """Take a sequence out of scheduling but keep its blocks (a prefill worker ships
        them before freeing)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def abort(self, request_id: str) -> Sequence | None:
        seq = self.get(request_id)
        if seq is not None:
            self.finish(seq, FinishReason.ABORT)
        return seq

    # -- one step ----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        prefill_budget = self.config.prefill_budget  # prompt chunks also count here
        scheduled: set[int] = set()
        decoding = [s for s in self.running if s.num_uncomputed_tokens == 1]
        prefilling = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_uncomputed_tokens, budget)
            if n > 1:
                n = min(n, prefill_budget)
                if n == 0:
                    break  # decodes all come first: only prompt chunks are left
            if not self._reserve_or_preempt(seq, n, scheduled, out):
                continue
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            scheduled.add(id(seq))
            budget -= n
            if n > 1:
                prefill_budget -= n

        budget = min(budget, prefill_budget)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            matched = self._match_prefix(seq)
            n = seq.num_uncomputed_tokens
            if n > budget:
                if not self.config.enable_chunked_prefill:
                    self._unmatch(seq, matched)
                    break
                n = budget
            if not self.kv.allocate_slots(seq.request_id, seq.num_computed_tokens + n):
                self._unmatch(seq, matched)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            budget -= n
        return out

    def _match_prefix(self, seq: Sequence) -> bool:
        """Start a sequence that has nothing computed from the longest cached prefix
        of its tokens; True when it found one."""
        if seq.num_computed_tokens or self.kv.owns(seq.request_id):
            return False
        hit = self.kv.match_prefix(seq)
        if not seq.output_token_ids:
            seq.num_cached_tokens = hit
        seq.num_computed_tokens = hit
        return hit > 0

    def _unmatch(self, seq: Sequence, matched: bool) -> None:
        """Give back a prefix taken for a sequence that stays waiting, so a waiting
        sequence holds no blocks (its blocks stay cached and are found again)."""
        if matched:
            self.kv.free(seq.request_id)
            seq.num_computed_tokens = 0

    def _reserve_or_preempt(
        self, seq: Sequence, n: int, scheduled: set[int], out: SchedulerOutput
    ) -> bool:
        while not self.kv.allocate_slots(seq.request_id, seq.num_computed_tokens + n):
            victim = self._youngest_unscheduled(scheduled)
            if victim is None:
                return False
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _youngest_unscheduled(self, scheduled: set[int]) -> Sequence | None:
        for seq in sorted(self.running, key=lambda s: s.arrival, reverse=True):
            if id(seq) not in scheduled:
                return seq
        return None

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.kv.free(seq.request_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(seq)
        if self.requeue_preempted:
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)
        else:
            seq.status = SequenceStatus.FINISHED

    def update(
        self,
        out: SchedulerOutput,
        sampled: dict[str, int],
        logprobs: dict[str, dict[int, float]] | None = None,
    ) -> list[Sequence]:
        """Apply one step's results; return the sequences that received a token."""
        got_token: list[Sequence] = []
        for chunk in out.chunks:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed_tokens = chunk.start + chunk.num_tokens
            self.kv.cache_full_blocks(seq)
            if not chunk.samples:
                continue
            seq.append_token(sampled[seq.request_id], (logprobs or {}).get(seq.request_id))
            got_token.append(seq)
            reason = check_stop(seq, self.eos_token_ids)
            if reason is not None:
                self.finish(seq, reason)
        return got_token
