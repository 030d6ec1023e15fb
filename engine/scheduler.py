"""Continuous batching with chunked prefill, in the manner of vLLM v1's scheduler.

Each step, under a token budget, every running sequence catches up `min(uncomputed, budget)` tokens
(one for a decode, a chunk for a prompt), then waiting sequences are admitted first-come first-served
while slots, blocks and budget last. The budget is `max_num_batched_tokens` while a running sequence
decodes, the larger `prefill_only_batched_tokens` while none does. When the pool runs out, device-resident sessions are moved to
host memory first, then the most recently arrived running sequences are preempted: their compressed
keys and RNN state go to host memory (small for GoldFinch) and come back later exactly as they were.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .cache_manager import CacheManager, num_blocks_for_tokens
from .sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # running sequences at once (each owns a state slot)
    max_num_batched_tokens: int = 2048  # tokens per step, decodes and prefill chunks together
    max_model_len: int = 4096  # prompt + generated tokens of one sequence
    # a prompt split into chunks ends with a chunk of at least this many tokens: the model's GOLD
    # layers then need nothing of the earlier chunks and skip them (engine.model); 0: no rule
    min_final_chunk: int = 0
    # tokens per step while no running sequence is decoding (0: max_num_batched_tokens). The small
    # budget bounds how long a step delays the decoding sequences' next tokens; with none decoding
    # it protects no one (waiting prompts queue behind the running one either way), and fewer,
    # longer prompt chunks run faster
    prefill_only_batched_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.prefill_only_batched_tokens < 0:
            raise ValueError(f"prefill_only_batched_tokens: must be >= 0, got {self.prefill_only_batched_tokens}")
        if not 0 <= self.min_final_chunk <= self.max_num_batched_tokens:
            raise ValueError(f"min_final_chunk: must be in [0, max_num_batched_tokens], got {self.min_final_chunk}")

    @property
    def max_step_tokens(self) -> int:
        """The most tokens any step schedules (the longest prompt chunk)."""
        return max(self.max_num_batched_tokens, self.prefill_only_batched_tokens)


@dataclass(frozen=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int
    context_len: int  # tokens computed before this step


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: CacheManager,
                 make_room: Callable[[], bool] = lambda: False) -> None:
        """`make_room` frees device cache held outside running sequences (sessions); it returns
        False when there is nothing left to free."""
        self.config = config
        self.cache = cache
        self.make_room = make_room
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions_total = 0

    # ---- queue -----------------------------------------------------------------------------------
    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Rejects up front a request that could never run (ValueError naming the limit)."""
        total = num_prompt_tokens + max_tokens
        if total > self.config.max_model_len:
            raise ValueError(f"prompt: {num_prompt_tokens} prompt tokens + max_tokens {max_tokens} = {total} "
                             f"exceeds the context limit of {self.config.max_model_len} tokens")
        capacity = self.cache.config.capacity_tokens
        if total > capacity:
            raise ValueError(f"prompt: {total} tokens can never fit the compressed-key pool of {capacity} tokens")

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Takes a sequence out of the queues (finished or cancelled); the caller frees its cache."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- one step --------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.step_budget())
        if not out.preempted:  # admitting while preempting would only thrash
            self._schedule_waiting(out, budget)
        return out

    def step_budget(self) -> int:
        """The step's token budget: the larger prefill-only one unless a running sequence decodes."""
        if any(not seq.is_prefilling for seq in self.running):
            return self.config.max_num_batched_tokens
        return self.config.max_step_tokens

    def num_new_tokens(self, seq: Sequence, budget: int) -> int:
        """Tokens `seq` catches up this step under `budget`: as many as fit, but never leaving a
        last chunk shorter than `min_final_chunk` (then fewer now, or none until it fits whole)."""
        uncomputed = seq.num_uncomputed_tokens
        n = min(uncomputed, budget)
        if 0 < uncomputed - n < self.config.min_final_chunk:
            n = max(0, uncomputed - self.config.min_final_chunk)
        return n

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        queue = list(self.running)
        kept: list[Sequence] = []
        while queue:
            seq = queue.pop(0)
            n = self.num_new_tokens(seq, budget)
            if n == 0:
                kept.append(seq)
                continue
            if self.cache.is_ready(seq, seq.num_computed_tokens + n):  # the usual decode step
                out.scheduled.append(ScheduledSequence(seq, n, seq.num_computed_tokens))
                kept.append(seq)
                budget -= n
                continue
            preempted_self = False
            while not self.cache.can_grow(seq, seq.num_computed_tokens + n):
                if self.make_room():
                    continue
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    preempted_self = True
                    break
            if preempted_self:
                continue
            self.cache.grow(seq, seq.num_computed_tokens + n)
            out.scheduled.append(ScheduledSequence(seq, n, seq.num_computed_tokens))
            kept.append(seq)
            budget -= n
        self.running = kept
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.session_claim is not None and seq.session_claim.absorbing:
                return  # its session's previous turn is feeding its last token: next step
            n = self.num_new_tokens(seq, budget)
            if n == 0:
                return  # its prompt's last chunk waits for a step with room for all of it
            while not self._can_admit(seq, n):
                if not self.make_room():
                    return
            self.waiting.popleft()
            self._admit(seq)
            self.cache.grow(seq, seq.num_computed_tokens + n)
            out.scheduled.append(ScheduledSequence(seq, n, seq.num_computed_tokens))
            self.running.append(seq)
            budget -= n

    def _can_admit(self, seq: Sequence, n: int) -> bool:
        pool = self.cache.pool
        claim = seq.session_claim
        if claim is not None and claim.on_device:
            # takes over the session's slot and blocks; may need more blocks for the new tokens
            return pool.num_free_blocks >= pool.blocks_needed(claim, seq.num_computed_tokens + n)
        blocks = num_blocks_for_tokens(seq.num_computed_tokens + n, self.cache.block_size)
        return pool.num_free_slots >= 1 and pool.num_free_blocks >= blocks

    def _admit(self, seq: Sequence) -> None:
        claim = seq.session_claim
        if claim is not None:
            seq.session_claim = None
            if claim.on_device:
                self.cache.transfer(claim, seq)
            else:
                self.cache.from_host(seq, claim.host_copy)
            claim.host_copy = None
        elif seq.host_copy is not None:
            self.cache.from_host(seq, seq.host_copy)
            seq.host_copy = None
        else:
            self.cache.admit(seq)
        if not seq.absorbing:
            seq.status = SequenceStatus.RUNNING
        if seq.scheduled_time is None:
            seq.scheduled_time = time.monotonic()

    def _preempt(self, seq: Sequence) -> None:
        seq.host_copy = self.cache.to_host(seq, seq.num_computed_tokens)
        if not seq.absorbing:  # an absorbing sequence stays finished for its request
            seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions_total += 1
        self.running.remove(seq) if seq in self.running else None
        self.waiting.appendleft(seq)
