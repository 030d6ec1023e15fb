"""Incremental, tokenizer-independent stop handling for one sequence.

The detokenizer pushes each new token's text increment; the checker answers
with the text that is safe to stream now.  Text that could still turn out to be
the beginning of a stop string is held back until it is resolved, so a client
never receives a stop string (or a prefix of one) that would later have to be
taken back.

Semantics (vLLM-compatible where vLLM defines them):

* A stop string may span any number of pushes.  The first stop string to
  *complete* in the text wins (ties: the one starting earliest); the output is
  cut at its start, or after it with ``include_stop_str_in_output``.  Because
  the winner is the first to complete, the result does not depend on how the
  text happened to be split into pushes.
* A token in ``stop_token_ids`` stops with ``matched`` = the token id; EOS
  (unless ``ignore_eos``) stops with ``matched`` = None, as vLLM's
  ``stop_reason``.  The stopping token's own text is dropped unless
  ``include_stop_str_in_output``; held-back text before it is released.
* As in vLLM, stops take effect from the ``min_tokens``-th pushed token on;
  text of earlier tokens is emitted as it comes and cannot be part of a match
  (the sampler masks EOS and stop ids for those tokens anyway).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from engine.sampling_params import SamplingParams

StopReason = Literal["stop"]


@dataclass(frozen=True)
class StopUpdate:
    """Result of one push: text safe to emit now, and whether generation ends."""

    text: str
    stopped: bool = False
    reason: StopReason | None = None
    matched: str | int | None = None


class StopChecker:
    """Per-sequence stop-string / stop-token detector with hold-back of partial matches."""

    def __init__(self, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                 eos_token_id: int | None = None, *, ignore_eos: bool = False,
                 include_stop_str_in_output: bool = False, min_tokens: int = 0) -> None:
        if any(not s for s in stop):
            raise ValueError("stop: stop sequences must be non-empty strings")
        self._stops: tuple[str, ...] = tuple(dict.fromkeys(stop))
        self._stop_token_ids: frozenset[int] = frozenset(stop_token_ids)
        self._eos_token_id = None if ignore_eos else eos_token_id
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens
        self._num_tokens = 0
        self._held = ""  # unemitted text that is a prefix of some stop string
        self._final: StopUpdate | None = None

    @classmethod
    def from_params(cls, params: SamplingParams, eos_token_id: int | None) -> StopChecker:
        return cls(params.stop, params.stop_token_ids, eos_token_id,
                   ignore_eos=params.ignore_eos,
                   include_stop_str_in_output=params.include_stop_str_in_output,
                   min_tokens=params.min_tokens)

    @property
    def stopped(self) -> bool:
        return self._final is not None

    @property
    def held_text(self) -> str:
        return self._held

    def is_stop_token(self, token_id: int) -> bool:
        """True for EOS (unless ignore_eos) and for any of stop_token_ids."""
        return token_id == self._eos_token_id or token_id in self._stop_token_ids

    def push(self, new_text: str, token_id: int) -> StopUpdate:
        """Feed one token's text increment; returns what may be emitted now."""
        if self._final is not None:
            raise RuntimeError("StopChecker.push called after the sequence stopped")
        self._num_tokens += 1
        if self._num_tokens < self._min_tokens:
            return StopUpdate(text=new_text)  # no stop can take effect yet: nothing to hold
        if self.is_stop_token(token_id):
            text = self._held + (new_text if self._include_stop else "")
            matched = token_id if token_id in self._stop_token_ids else None
            return self._stop(text, matched)
        if not self._stops:  # token stops only (most requests): nothing is ever held back
            return StopUpdate(text=new_text)
        buffer = self._held + new_text
        match = self._earliest_match(buffer)
        if match is not None:
            start, stop = match
            end = start + len(stop) if self._include_stop else start
            return self._stop(buffer[:end], stop)
        hold = self._partial_suffix_len(buffer)
        self._held = buffer[len(buffer) - hold:] if hold else ""
        return StopUpdate(text=buffer[: len(buffer) - hold])

    def flush(self) -> str:
        """Release held-back text when the sequence ends for another reason (e.g. length)."""
        text, self._held = self._held, ""
        return text

    def _stop(self, text: str, matched: str | int | None) -> StopUpdate:
        self._held = ""
        self._final = StopUpdate(text=text, stopped=True, reason="stop", matched=matched)
        return self._final

    def _earliest_match(self, buffer: str) -> tuple[int, str] | None:
        """(start, stop string) of the match that completes first, or None.

        ``buffer`` never contains a complete match from an earlier push (we would
        have stopped), and emitted text cannot be part of a future match (it was
        not a possible stop prefix), so searching the buffer alone is exact.
        """
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            start = buffer.find(stop)
            if start >= 0:
                candidate = (start + len(stop), start, stop)
                if best is None or candidate[:2] < best[:2]:
                    best = candidate
        return None if best is None else (best[1], best[2])

    def _partial_suffix_len(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop string."""
        longest = max((len(s) for s in self._stops), default=0)
        for size in range(min(len(buffer), longest - 1), 0, -1):
            suffix = buffer[-size:]
            if any(s.startswith(suffix) for s in self._stops):
                return size
        return 0
