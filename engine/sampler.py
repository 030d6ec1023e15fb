"""Batched token sampler that runs on the logits' device (CPU or CUDA).

Pipeline per step, in vLLM's order: (1) logit_bias is added, then EOS and stop_token_ids
are masked to -inf for rows that have generated fewer than min_tokens tokens; (2) repetition
penalty over prompt + output tokens (positive logits divided, negative multiplied), then
frequency (x count) and presence penalties over output tokens; (3) greedy rows take the
argmax, the others are scaled by temperature, truncated by top-k, top-p (on the
top-k-renormalised distribution, at least one token kept) and min-p, and drawn.

Reported log-probabilities are those of the model's *raw* distribution (log_softmax of the
logits before bias, penalties, temperature and truncation), vLLM's default ("raw_logprobs").

Randomness (`engine.sampling_noise`) is a counter-based hash of (seed, step, token id) in exact
integer arithmetic on int64 tensors, so a row's draw depends only on its own seed and step: the
same alone or at any position of any batch, and on CPU and CUDA (the integer hash is
bit-identical; only the float tail may differ in the last ulp).  Tokens are drawn by the exponential race
``argmax(p / E)``, ``E = -log(u) ~ Exp(1)``: exact sampling from ``p``, no cumsum needed.

On CUDA, a batch that only scales by temperature and cuts by top-p (greedy rows among it) is drawn
by `kernels.token_sample` in one to three launches instead of this torch pipeline (~20-30): the
same noise, the same top-p set, the same tokens (two ids whose scores agree to ~1e-6, or an id
whose excluded mass is within ~1e-6 of top_p, may fall either way; tested on the GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
from torch import Tensor

from engine.host_copy import to_device
from engine.sampling_noise import exponential_noise, to_int64
from engine.sampling_params import SamplingParams
from kernels.dispatch import greedy_counters, token_sample, use_triton

@dataclass(frozen=True, eq=False)
class SamplingBatch:
    """Per-step, per-row sampling state as device tensors (built by make_sampling_batch).

    Python-side ``need_*`` flags let the sampler skip stages without a device sync.
    Greedy rows carry temperature 1.0 so the shared path never divides by zero.
    """

    vocab_size: int
    temperature: Tensor  # [B] float32
    top_p: Tensor  # [B] float32
    top_k: Tensor  # [B] int64, vocab_size when off
    min_p: Tensor  # [B] float32
    presence_penalty: Tensor  # [B] float32
    frequency_penalty: Tensor  # [B] float32
    repetition_penalty: Tensor  # [B] float32
    greedy: Tensor  # [B] bool
    seeds: Tensor  # [B] int64
    steps: Tensor  # [B] int64
    bias: tuple[Tensor, Tensor, Tensor] | None  # logit_bias (rows, token ids, values)
    mask_index: tuple[Tensor, Tensor] | None  # (rows, token ids) masked by min_tokens
    output_counts: Tensor | None  # [B, V] float32 counts of output tokens
    prompt_mask: Tensor | None  # [B, V] bool, prompt tokens (repetition penalty only)
    num_logprobs: tuple[int, ...]  # per-row top-logprob count (0 when off)
    all_greedy: bool
    any_greedy: bool
    need_top_k: bool
    need_top_p: bool
    need_min_p: bool
    need_penalties: bool
    need_repetition: bool

    @property
    def batch_size(self) -> int:
        return int(self.temperature.shape[0])

    @property
    def max_num_logprobs(self) -> int:
        return max(self.num_logprobs, default=0)


def _token_counts(token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> Tensor:
    """[B, V] float32 occurrence counts via one flat np.fromiter array (several times
    faster than a tensor per row), one host-to-device copy and one index_add_."""
    lengths = [len(t) for t in token_lists]
    flat = np.fromiter(chain.from_iterable(token_lists), dtype=np.int64, count=sum(lengths))
    if flat.size and not 0 <= int(flat.min()) <= int(flat.max()) < vocab_size:
        raise ValueError(f"token_ids: ids must be in [0, {vocab_size}) for the penalties")
    offsets = np.repeat(np.arange(len(lengths), dtype=np.int64) * vocab_size, lengths)
    index = to_device(offsets + flat, torch.int64, device)
    counts = torch.zeros(len(lengths) * vocab_size, dtype=torch.float32, device=device)
    counts.index_add_(0, index, torch.ones(1, dtype=torch.float32, device=device).expand(index.shape))
    return counts.view(len(lengths), vocab_size)


def _check_token(name: str, token_id: int, vocab_size: int) -> None:
    if not 0 <= token_id < vocab_size:
        raise ValueError(f"{name}: token id {token_id} out of range for vocabulary size {vocab_size}")


def _sparse_entries(params: Sequence[SamplingParams], step_index: Sequence[int], vocab_size: int,
                    eos_token_id: int | None, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    """logit_bias as [3, n] float64 (row, id, value; ids exact) and min_tokens-masked [2, m]."""
    bias: list[tuple[int, int, float]] = []
    masked: list[tuple[int, int]] = []
    for row, p in enumerate(params):
        for token_id, value in p.logit_bias:
            _check_token("logit_bias", token_id, vocab_size)
            bias.append((row, token_id, value))
        if step_index[row] < p.min_tokens:
            banned = set(p.stop_token_ids)
            if eos_token_id is not None and not p.ignore_eos:
                banned.add(eos_token_id)
            for token_id in sorted(banned):
                _check_token("stop_token_ids", token_id, vocab_size)
                masked.append((row, token_id))
    bias_t = to_device(torch.tensor(bias, dtype=torch.float64).T.contiguous(), torch.float64, device) if bias else None
    masked_t = to_device(torch.tensor(masked, dtype=torch.int64).T.contiguous(), torch.int64, device) if masked else None
    return bias_t, masked_t


def make_sampling_batch(params: Sequence[SamplingParams], output_token_ids: Sequence[Sequence[int]],
                        prompt_token_ids: Sequence[Sequence[int]], step_index: Sequence[int],
                        vocab_size: int, device: torch.device | str, *, seeds: Sequence[int],
                        eos_token_id: int | None = None) -> SamplingBatch:
    """Gather per-row parameters into device tensors, once per decoding step.

    ``step_index[i]`` (tokens row i has generated so far) keys the random stream and
    gates min_tokens.  ``seeds[i]`` is the row's resolved seed (``resolve_seed``), so
    unseeded rows are reproducible too given their drawn seed.  Ids must be < vocab_size.
    """
    n = len(params)
    if n == 0 or not n == len(output_token_ids) == len(prompt_token_ids) == len(step_index) == len(seeds):
        raise ValueError("make_sampling_batch: need >= 1 row and equal-length per-row inputs")
    device = torch.device(device)
    greedy = [p.greedy for p in params]
    sampling = [p for p, g in zip(params, greedy) if not g]
    scalars = torch.tensor([
        [1.0 if g else p.temperature for p, g in zip(params, greedy)],
        [p.top_p for p in params], [p.min_p for p in params],
        [p.presence_penalty for p in params], [p.frequency_penalty for p in params],
        [p.repetition_penalty for p in params],
    ], dtype=torch.float32).reshape(6, n)
    scalars = to_device(scalars, torch.float32, device)  # queued: the model step may still be running
    ints = torch.tensor([
        [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params],
        [to_int64(s) for s in seeds], list(step_index), [int(g) for g in greedy],
    ], dtype=torch.int64).reshape(4, n)
    ints = to_device(ints, torch.int64, device)
    bias, masked = _sparse_entries(params, step_index, vocab_size, eos_token_id, device)
    need_penalties = any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params)
    need_repetition = any(p.repetition_penalty != 1.0 for p in params)
    counts = (_token_counts(output_token_ids, vocab_size, device)
              if need_penalties or need_repetition else None)
    prompt_mask = _token_counts(prompt_token_ids, vocab_size, device) > 0 if need_repetition else None
    return SamplingBatch(
        vocab_size=vocab_size, temperature=scalars[0], top_p=scalars[1], min_p=scalars[2],
        presence_penalty=scalars[3], frequency_penalty=scalars[4], repetition_penalty=scalars[5],
        top_k=ints[0], seeds=ints[1], steps=ints[2], greedy=ints[3].bool(),
        bias=None if bias is None else (bias[0].long(), bias[1].long(), bias[2].float()),
        mask_index=None if masked is None else (masked[0], masked[1]),
        output_counts=counts, prompt_mask=prompt_mask,
        num_logprobs=tuple(p.logprobs or 0 for p in params),
        all_greedy=not sampling, any_greedy=any(greedy),
        need_top_k=any(0 < p.top_k < vocab_size for p in sampling),
        need_top_p=any(p.top_p < 1.0 for p in sampling),
        need_min_p=any(p.min_p > 0.0 for p in sampling),
        need_penalties=need_penalties, need_repetition=need_repetition,
    )


def apply_penalties_and_bias(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Steps 1-2 of the pipeline on logits [B, V]; returns a new float32 tensor, or float32 `logits`
    themselves when the batch has nothing to apply (callers never write to the result)."""
    if (batch.bias is None and batch.mask_index is None and not batch.need_penalties
            and not batch.need_repetition and logits.dtype == torch.float32):
        return logits
    out = logits.to(torch.float32, copy=True)
    if batch.bias is not None:
        out.index_put_(batch.bias[:2], batch.bias[2], accumulate=True)
    if batch.mask_index is not None:
        out.index_put_(batch.mask_index, torch.tensor(float("-inf"), device=out.device))
    counts = batch.output_counts
    if batch.need_repetition and counts is not None and batch.prompt_mask is not None:
        seen = batch.prompt_mask | (counts > 0)
        rp = batch.repetition_penalty.unsqueeze(1)
        out = torch.where(seen, torch.where(out > 0, out / rp, out * rp), out)
    if batch.need_penalties and counts is not None:
        out = out - batch.frequency_penalty.unsqueeze(1) * counts
        out = out - batch.presence_penalty.unsqueeze(1) * (counts > 0).to(out.dtype)
    return out


def _apply_top_k_top_p(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Mask to -inf outside top-k (ties with the k-th kept, as vLLM), then outside the
    top-p nucleus of what is left: the smallest prefix whose mass reaches top_p, with every
    id equal to its last (ties at the cut all kept).  Rows with top_p == 1 are untouched so
    cumsum rounding cannot drop tail tokens."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if batch.need_top_k:
        kth = sorted_logits.gather(1, (batch.top_k - 1).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if batch.need_top_p:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop = (mass_before >= batch.top_p.unsqueeze(1)) & (batch.top_p < 1.0).unsqueeze(1)
        drop[:, 0] = False
        # every id equal to the last one kept stays too: the set then does not depend on the
        # order the sort gives ties (common in bf16 logits), and a kernel can find it without one
        cut = sorted_logits.masked_fill(drop, float("inf")).amin(dim=-1, keepdim=True)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < cut, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


@dataclass(frozen=True, eq=False)
class SamplerOutput:
    """Chosen tokens and raw log-probs; top_* are [B, k_max], best first, when any row
    asked for logprobs >= 1 (row i uses its first ``batch.num_logprobs[i]`` columns)."""

    token_ids: Tensor  # [B] int64
    logprobs: Tensor  # [B] float32, raw log-prob of the chosen token
    top_logprob_ids: Tensor | None = None
    top_logprobs: Tensor | None = None


class Sampler:
    """Batched sampler: ``Sampler()(logits, batch) -> SamplerOutput``; no per-request state.

    ``compile_noise=True`` runs the noise hash through ``torch.compile`` on CUDA: the
    eager hash is ~40 bandwidth-bound int64 passes over [B, V] (4.9 ms at B=256,
    V=65536 on an H100, half the step) and fuses into one kernel (0.13 ms, bit-identical,
    dynamic batch size), at the price of a one-off ~20 s compile.
    """

    def __init__(self, compile_noise: bool = False) -> None:
        self._compiled_noise: Callable[[Tensor, Tensor, int], Tensor] | None = (
            torch.compile(exponential_noise, dynamic=True) if compile_noise else None)
        self._arrivals: dict[torch.device, Tensor] = {}  # the fused kernel's row counters (left zero)

    def __call__(self, logits: Tensor, batch: SamplingBatch, n_valid: int | None = None) -> SamplerOutput:
        """`n_valid`: ids at or above it are never sampled and lie outside the log-probs' softmax
        (as logits of -inf there would be); None: every id."""
        if logits.dim() != 2 or tuple(logits.shape) != (batch.batch_size, batch.vocab_size):
            raise ValueError(f"logits: expected shape ({batch.batch_size}, {batch.vocab_size}), "
                             f"got {tuple(logits.shape)}")
        n_valid = batch.vocab_size if n_valid is None else n_valid
        if not 1 <= n_valid <= batch.vocab_size:
            raise ValueError(f"n_valid: {n_valid} not in [1, {batch.vocab_size}]")
        if self.fused_applies(logits, batch):
            token_ids, chosen = token_sample(logits, n_valid, batch.temperature, batch.greedy, batch.seeds, batch.steps,
                                             self._counters(logits.device, batch.batch_size),
                                             top_p=batch.top_p if batch.need_top_p else None)
            return SamplerOutput(token_ids=token_ids, logprobs=chosen)
        # one conversion for both uses (bf16 from the model step); a copy where ids are masked
        logits = logits.to(torch.float32, copy=n_valid < batch.vocab_size)
        if n_valid < batch.vocab_size:
            logits[:, n_valid:] = float("-inf")
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        processed = apply_penalties_and_bias(logits, batch)
        token_ids = self.choose(processed, batch)
        chosen = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        k = min(batch.max_num_logprobs, batch.vocab_size)
        if k == 0:
            return SamplerOutput(token_ids=token_ids, logprobs=chosen)
        top_values, top_ids = raw_logprobs.topk(k, dim=-1, sorted=True)
        return SamplerOutput(token_ids=token_ids, logprobs=chosen,
                             top_logprob_ids=top_ids, top_logprobs=top_values)

    @staticmethod
    def fused_applies(logits: Tensor, batch: SamplingBatch) -> bool:
        """Whether the batch is drawn by one kernel (`kernels.token_sample`, the same tokens): on
        CUDA, rows that only scale by temperature and cut by top-p (16-bit logits for top-p), no
        logit_bias, min_tokens mask, penalties, top-k, min-p or top log-probabilities."""
        plain = (batch.bias is None and batch.mask_index is None and not batch.need_penalties
                 and not batch.need_repetition and not batch.need_top_k and not batch.need_min_p
                 and batch.max_num_logprobs == 0)
        sixteen_bit = logits.dtype in (torch.float16, torch.bfloat16)
        return plain and use_triton(logits) and (sixteen_bit or not batch.need_top_p)

    def _counters(self, device: torch.device, rows: int) -> Tensor:
        counters = self._arrivals.get(device)
        if counters is None or counters.numel() < rows:
            counters = self._arrivals[device] = greedy_counters(device, max(rows, 64))
        return counters

    def choose(self, processed: Tensor, batch: SamplingBatch) -> Tensor:
        """Step 3: argmax for greedy rows, truncated seeded sampling for the rest."""
        if batch.all_greedy:
            return processed.argmax(dim=-1)
        scaled = processed / batch.temperature.unsqueeze(1)
        if batch.need_top_k or batch.need_top_p:
            scaled = _apply_top_k_top_p(scaled, batch)
        probs = scaled.softmax(dim=-1)
        if batch.need_min_p:
            # min_p is relative to the top probability, so renormalisation is unneeded.
            threshold = batch.min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < threshold, 0.0)
        use_compiled = self._compiled_noise is not None and processed.is_cuda
        noise = (self._compiled_noise if use_compiled else exponential_noise)(
            batch.seeds, batch.steps, batch.vocab_size)
        sampled = (probs / noise).argmax(dim=-1)  # exponential race: unnormalised p is fine
        if not batch.any_greedy:
            return sampled
        return torch.where(batch.greedy, processed.argmax(dim=-1), sampled)
