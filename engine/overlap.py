"""Overlapping the host's work with the GPU's: a decode step launched ahead of its inputs' tokens.

In a steady stream of decode steps the host's part of every step (reading the sampled tokens back,
detokenizing, stop checks, scheduling, building the next step's inputs: 1-2 ms at batch 64) would
leave the GPU idle. When the next step is certain to be one more decode of the same sequences, it
is launched right after the current one, taking its input tokens straight from the current step's
sampler output on the device; the current step's tokens are then read and processed while the GPU
runs the next. A sequence that turns out to have finished (end of sequence, a stop string, an abort)
wastes its row of the step launched ahead, which is dropped; anything that could make the next step
differ (a request waiting to be admitted, a sequence reaching its length limit, a session, penalties
that read the previous tokens, a block that cannot grow) waits for the tokens instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .sampler import SamplerOutput
from .scheduler import ScheduledSequence, SchedulerOutput
from .sequence import Sequence


@dataclass
class HostSamples:
    """A step's sampler output on its way to host memory: copies queued right behind the sampler,
    so that waiting for them waits for this step only. (Reading the device tensors directly would
    queue the copy behind everything launched since, the next step included, and the GPU would
    idle again while the host works.)"""

    tensors: tuple[Tensor | None, ...]  # token ids, logprobs, top-logprob ids, top logprobs
    copied: torch.cuda.Event | None  # None on the CPU: the copies are done

    @classmethod
    def queue(cls, result: SamplerOutput) -> "HostSamples":
        device = result.token_ids.device
        tensors = (result.token_ids, result.logprobs, result.top_logprob_ids, result.top_logprobs)
        if device.type != "cuda":
            return cls(tensors, None)
        host = tuple(None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                     for t in tensors)
        event = torch.cuda.Event()
        event.record()
        return cls(host, event)

    def lists(self) -> tuple[list | None, ...]:
        """Waits for the copies; the four as Python lists (None where the sampler gave none)."""
        if self.copied is not None:
            self.copied.synchronize()
        return tuple(None if t is None else t.tolist() for t in self.tensors)


@dataclass
class LaunchedStep:
    """A step on its way through the device: what was scheduled, which rows sample a token, and the
    sampler's output (device tensors, the next step's input tokens) with its copy to the host."""

    sched: SchedulerOutput
    ready: list[tuple[int, Sequence]]  # (logits row, sequence) of every token sampled
    sample: SamplerOutput | None
    host: HostSamples | None = None

    def __post_init__(self) -> None:
        if self.sample is not None and self.host is None:
            self.host = HostSamples.queue(self.sample)


def can_launch_ahead(engine, current: LaunchedStep) -> bool:
    """Whether the step after `current` is certainly one more decode of exactly its sequences, one
    token each, fed the tokens `current` samples, and nothing else would be scheduled."""
    scheduled = current.sched.scheduled
    if current.sample is None or len(current.ready) != len(scheduled):
        return False
    if any(row != i or s.seq is not seq for i, ((row, seq), s) in enumerate(zip(current.ready, scheduled))):
        return False  # a prompt still being prefilled, or samples forked off it
    scheduler = engine.scheduler
    if scheduler.waiting and len(scheduler.running) < scheduler.config.max_num_seqs:
        return False  # the scheduler may admit a waiting request next step
    if len(scheduler.running) != len(scheduled):
        return False  # a running sequence outside this step (over the token budget)
    max_len = engine.config.max_model_len
    for s in scheduled:
        seq = s.seq
        request = engine.requests.get(seq.request_id)
        if request is None or request.session is not None or seq.absorbing or seq.is_finished:
            return False
        if request.params.n != 1 and not request.forked:
            return False
        if not _params_ignore_history(seq):
            return False
        if len(seq.output_token_ids) + 1 >= seq.params.max_tokens or seq.num_tokens + 1 >= max_len:
            return False  # the token being sampled ends it for certain
    return True


def _params_ignore_history(seq: Sequence) -> bool:
    """The sampler needs the previous tokens on the host only for penalties."""
    p = seq.params
    return p.presence_penalty == 0.0 and p.frequency_penalty == 0.0 and p.repetition_penalty == 1.0


def next_decode_step(cache, current: LaunchedStep) -> SchedulerOutput | None:
    """The decode step after `current`: every sequence one token further, its blocks grown for it
    (None if one cannot grow without preempting: the scheduler decides that, with the tokens)."""
    nxt = SchedulerOutput([ScheduledSequence(s.seq, 1, s.context_len + s.num_new_tokens)
                           for s in current.sched.scheduled])
    for s in nxt.scheduled:
        needed = s.context_len + 1
        if not cache.is_ready(s.seq, needed):
            if not cache.can_grow(s.seq, needed):
                return None
            cache.grow(s.seq, needed)
    return nxt
