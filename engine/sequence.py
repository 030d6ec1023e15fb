"""A sequence being generated: its tokens, progress, and the cache resources it owns.

Prefill and decode are one mechanism (vLLM v1's rule): a sequence has `num_tokens` (prompt plus
generated) and `num_computed_tokens` (those the model has consumed into its state and cache); each
step the scheduler decides how many of the difference it catches up.

The block table and the state slot belong to the sequence, but only the cache pool changes them.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not yet on the device (new, or preempted to host memory)
    RUNNING = "running"  # owns a state slot and its blocks on the device
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # cancelled by the caller (client gone)
    ERROR = "error"  # the model step failed


@dataclass
class HostCopy:
    """A preempted sequence's device state, moved to host memory (small for GoldFinch)."""

    compressed_keys: Any  # Tensor [num_computed_tokens, Cc]
    token_ids: Any  # Tensor [num_computed_tokens]
    rnn_state: dict  # RNNStatePool.save() of its slot


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # resolved sampling seed (the request's, or drawn at creation)
    arrival_time: float = field(default_factory=time.monotonic)
    session_id: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[Any] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens taken from a session/fork instead of prefilled
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    # owned resources, changed only by the cache pool
    block_table: list[int] = field(default_factory=list)
    state_slot: int | None = None
    host_copy: HostCopy | None = None
    session_claim: Any = None  # a Session whose state this sequence resumes when admitted
    sample_index: int = 0  # which of the request's n samples this is
    absorbing: bool = False  # finished; feeding its last token so its session covers every token
    # the last step was a prompt chunk that skipped the GOLD layers (engine.model): their token-shift
    # state lags the Finch layers' until the prompt's last chunk, so this state is no session's to keep
    gold_lags: bool = False
    num_preemptions: int = 0
    first_token_time: float | None = None
    scheduled_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def token_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    def token_range(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) (a step's new tokens: slices, not a call per token)."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:n] + self.output_token_ids[max(start - n, 0):end - n]

    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids
