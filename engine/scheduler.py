"""Continuous batching with one token budget per step and no prefill/decode phases.

Each step walks the running sequences (oldest first), then the waiting ones, giving each as
many of its uncomputed tokens as the budget allows: one for a decoding sequence, a chunk of
the prompt for a prefilling one. When the KV cache runs out, the newest running sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed
(or found in the prefix cache) later. Nothing is ever dropped.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from pagoda.engine.block_manager import BlockManager
from pagoda.engine.sequence import Sequence, SequenceStatus
from pagoda.engine.stats import QUEUE_TIME_BUCKETS, Histogram


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)

    def samples(self, i: int) -> bool:
        """Whether sequence i reaches its last token this step, so a token is sampled."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == seq.num_tokens


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.queue_time = Histogram(QUEUE_TIME_BUCKETS)  # arrival to first step, per request

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted = self._schedule_running(batch, budget)
        budget -= sum(batch.num_new_tokens)
        if not preempted:
            self._schedule_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> bool:
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.can_allocate(
                self.block_manager.blocks_needed(seq, num_new)
            ):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    return preempted
            self.block_manager.allocate(seq, num_new)
            batch.add(seq, num_new)
            budget -= num_new
            i += 1
        return preempted

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        manager = self.block_manager
        compiling: list[Sequence] = []  # set aside so that the others go ahead
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.waiting_for_grammar:
                compiling.append(self.waiting.popleft())
                continue
            if _prompt_pending(seq.shares_prompt_with):
                break  # wait one step: the sibling's prompt blocks are cached after it
            if seq.num_computed_tokens == 0:
                manager.take_cached_prefix(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not manager.can_allocate(manager.blocks_needed(seq, num_new)):
                self._reset(seq)
                break
            manager.allocate(seq, num_new)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.first_scheduled_time is None:
                self._first_scheduled(seq)
            batch.add(seq, num_new)
            budget -= num_new
        self.waiting.extendleft(reversed(compiling))

    def update(self, batch: ScheduledBatch, sampled: dict[int, tuple[int, dict | None]]) -> None:
        """Advance the scheduled sequences; `sampled[i]` is the token (and logprobs) drawn for
        batch entry i, present exactly for the entries where `batch.samples(i)`."""
        for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            seq.num_computed_tokens += num_new
            self.block_manager.cache_computed_blocks(seq)
            if i in sampled:
                token_id, logprobs = sampled[i]
                seq.append(token_id, logprobs)
                if seq.finish_reason is not None:
                    self.finish(seq)

    def finish(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq)

    def _first_scheduled(self, seq: Sequence) -> None:
        seq.first_scheduled_time = time.monotonic()
        if seq.index == 0:  # once per request, whatever its n
            self.queue_time.observe(seq.first_scheduled_time - seq.arrival_time)

    def _preempt(self, seq: Sequence) -> None:
        self._reset(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _reset(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.prompt_logprobs.clear()  # recomputed with the prompt


def _prompt_pending(sibling: Sequence | None) -> bool:
    return (
        sibling is not None
        and not sibling.is_finished
        and sibling.num_computed_tokens < sibling.num_prompt_tokens
    )
