"""Per-request sampling parameters with OpenAI / vLLM semantics.

`SamplingParams` is immutable and hashable so that it can be shared between the
HTTP layer, the scheduler and the sampler without defensive copies.  Every
validation error is a `ValueError` whose message starts with the offending
field name followed by a colon (``"top_p: must be in (0, 1], got 0"``): the
HTTP layer splits on the first colon to fill OpenAI's ``param`` field.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Limits follow the OpenAI API (and vLLM's checks of it).
MAX_TEMPERATURE = 2.0
MAX_ABS_PENALTY = 2.0
MAX_ABS_LOGIT_BIAS = 100.0
MAX_LOGPROBS = 20
SEED_BITS = 63  # fresh seeds fit a non-negative int64 on every device

_MASK64 = (1 << 64) - 1


def _fail(name: str, message: str) -> ValueError:
    return ValueError(f"{name}: {message}")


def _as_int(name: str, value: Any) -> int:
    # bool is an int subclass; `n=True` is almost certainly a client bug.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, f"must be an integer, got {value!r}")
    return value


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(name, f"must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise _fail(name, f"must be finite, got {value!r}")
    return value


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise _fail(name, f"must be in [{lo:g}, {hi:g}], got {value!r}")


def _normalise_logit_bias(raw: Any) -> tuple[tuple[int, float], ...]:
    """Turn a mapping (JSON keys arrive as strings) into sorted (id, bias) pairs."""
    items: Iterable[Any] = raw.items() if isinstance(raw, Mapping) else raw
    pairs: dict[int, float] = {}
    for item in items:
        try:
            key, value = item
        except (TypeError, ValueError):
            raise _fail("logit_bias", f"entries must be (token_id, bias) pairs, got {item!r}")
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            key = int(key)
        key = _as_int("logit_bias", key)
        if key < 0:
            raise _fail("logit_bias", f"token id must be >= 0, got {key}")
        bias = _as_float("logit_bias", value)
        if abs(bias) > MAX_ABS_LOGIT_BIAS:
            raise _fail("logit_bias", f"bias for token {key} must be in [-100, 100], got {bias!r}")
        pairs[key] = bias
    return tuple(sorted(pairs.items()))


def _normalise_stop(raw: Any) -> tuple[str, ...]:
    # OpenAI accepts a single string or a list of strings.
    stops = (raw,) if isinstance(raw, str) else tuple(raw or ())
    for s in stops:
        if not isinstance(s, str) or not s:
            raise _fail("stop", f"stop sequences must be non-empty strings, got {s!r}")
    return tuple(dict.fromkeys(stops))  # de-duplicate, keep order


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request (immutable, hashable, validated).

    ``logit_bias`` may be given as a mapping; it is stored as a sorted tuple of
    ``(token_id, bias)`` pairs so the dataclass stays hashable.  ``stop`` may be
    given as one string.  ``top_k`` of 0 or -1 disables top-k.  ``logprobs`` of
    None disables log-probabilities; 0..20 is the number of top alternatives.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        # Normalise first (frozen, hence object.__setattr__), then check ranges.
        setattr_ = object.__setattr__
        for name in ("temperature", "top_p", "min_p", "presence_penalty",
                     "frequency_penalty", "repetition_penalty"):
            setattr_(self, name, _as_float(name, getattr(self, name)))
        for name in ("n", "top_k", "max_tokens", "min_tokens"):
            _as_int(name, getattr(self, name))
        setattr_(self, "logit_bias", _normalise_logit_bias(self.logit_bias))
        setattr_(self, "stop", _normalise_stop(self.stop))
        setattr_(self, "stop_token_ids",
                 tuple(_as_int("stop_token_ids", t) for t in (self.stop_token_ids or ())))
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, f"must be a boolean, got {getattr(self, name)!r}")
        self._validate_ranges()

    def _validate_ranges(self) -> None:
        if self.n < 1:
            raise _fail("n", f"must be >= 1, got {self.n}")
        _check_range("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        if not 0.0 < self.top_p <= 1.0:
            raise _fail("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.top_k < -1:
            raise _fail("top_k", f"must be -1 or 0 (disabled) or >= 1, got {self.top_k}")
        _check_range("min_p", self.min_p, 0.0, 1.0)
        _check_range("presence_penalty", self.presence_penalty, -MAX_ABS_PENALTY, MAX_ABS_PENALTY)
        _check_range("frequency_penalty", self.frequency_penalty, -MAX_ABS_PENALTY, MAX_ABS_PENALTY)
        if self.repetition_penalty <= 0.0:
            raise _fail("repetition_penalty", f"must be > 0, got {self.repetition_penalty!r}")
        if self.seed is not None:
            _as_int("seed", self.seed)
        if self.max_tokens < 1:
            raise _fail("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise _fail("min_tokens",
                        f"must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if any(t < 0 for t in self.stop_token_ids):
            raise _fail("stop_token_ids", f"token ids must be >= 0, got {self.stop_token_ids}")
        if self.logprobs is not None:
            _check_range("logprobs", _as_int("logprobs", self.logprobs), 0, MAX_LOGPROBS)

    def validate_for_vocab(self, vocab_size: int) -> None:
        """Check token ids against the model's vocabulary (known only at admission)."""
        for token_id, _ in self.logit_bias:
            if token_id >= vocab_size:
                raise _fail("logit_bias",
                            f"token id {token_id} out of range for vocabulary size {vocab_size}")
        for token_id in self.stop_token_ids:
            if token_id >= vocab_size:
                raise _fail("stop_token_ids",
                            f"token id {token_id} out of range for vocabulary size {vocab_size}")

    @property
    def greedy(self) -> bool:
        """True when the choice is deterministic argmax (temperature 0 or top_k 1)."""
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    @property
    def logit_bias_dict(self) -> dict[int, float]:
        return dict(self.logit_bias)


def _splitmix64(x: int) -> int:
    """One splitmix64 step on Python ints (exact: Python ints never overflow)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def resolve_seed(params: SamplingParams, index: int = 0) -> int:
    """The seed to give a sequence of a request, fixed once at request creation.

    With a user seed, sequence 0 uses it unchanged and sequence ``index > 0`` of
    an ``n > 1`` request gets a distinct seed derived from it deterministically
    (otherwise all ``n`` completions would be identical).  Without a user seed a
    fresh ``secrets.randbits(63)`` is drawn per call.
    """
    if index < 0:
        raise ValueError(f"index: must be >= 0, got {index}")
    if params.seed is None:
        return secrets.randbits(SEED_BITS)
    if index == 0:
        return params.seed
    return _splitmix64((params.seed & _MASK64) ^ _splitmix64(index)) >> (64 - SEED_BITS)
