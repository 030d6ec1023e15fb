"""What the engine hands back: cumulative outputs per request and increments for streaming."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first


@dataclass
class CompletionOutput:
    """One of a request's n samples, cumulative."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it


@dataclass(frozen=True)
class CompletionDelta:
    """What one sample gained in one step (for streaming)."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None
    stop_reason: str | int | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens taken from a session instead of prefilled

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    session_id: str | None = None
    error: str | None = None
    arrival_time: float = 0.0
    scheduled_time: float | None = None  # first admitted to the device
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def usage(self) -> Usage:
        return Usage(prompt_tokens=len(self.prompt_token_ids),
                     completion_tokens=sum(len(o.token_ids) for o in self.outputs),
                     cached_tokens=self.num_cached_tokens)


@dataclass(frozen=True)
class RequestUpdate:
    """One step's news for a request: the deltas of its samples, and the cumulative output.

    `finished` is taken when the update is made: `output` is shared and keeps changing, and a
    consumer that lags behind the engine must not take an earlier update for the last one."""

    request_id: str
    deltas: tuple[CompletionDelta, ...]
    output: RequestOutput
    finished: bool

    @classmethod
    def of(cls, request_id: str, deltas, output: RequestOutput) -> "RequestUpdate":
        return cls(request_id, tuple(deltas), output, output.finished)
