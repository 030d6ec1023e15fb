"""Seeded sampling of a step's logits (PyTorch reference of `kernels.token_sample` and
`kernels.top_p_threshold`).

For each row b, over the ids below n_valid, with x = logits[b] read as float32:

    greedy[b]:  token = argmax(x)                                   (the first of equal maxima)
    otherwise:  s     = x / temperature[b], truncated to its top-p set when top_p[b] < 1: the ids
                        whose s has mass(softmax(s) strictly above it) < top_p[b] (ties at the cut
                        all kept), the others -inf
                p     = softmax(s)
                token = argmax(p / E),  E = exponential_noise(seeds[b], steps[b])   (an exact draw
                from p: the exponential race, `engine.sampling_noise`)
    logprob     = log_softmax(x)[token]                             (the raw distribution's)

This is `engine.sampler.Sampler` op for op on a batch without logit_bias, penalties, min_tokens
masks, top-k, min-p or top log-probabilities (ids at or above n_valid: its -inf mask).
"""
from __future__ import annotations

import torch
from torch import Tensor

from engine.sampling_noise import exponential_noise


def top_p_keep(scaled: Tensor, top_p: Tensor) -> Tensor:
    """[B, V] bool: the ids of each row's top-p set (every id where top_p >= 1), the sampler's
    sort-based rule: the smallest prefix of the sorted row whose mass reaches top_p, widened to
    every id equal to its last (so the set does not depend on how the sort orders ties)."""
    sorted_s, order = scaled.sort(dim=-1, descending=True)
    probs = sorted_s.softmax(dim=-1)
    drop = (probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)
    drop[:, 0] = False
    cut = sorted_s.masked_fill(drop, float("inf")).amin(dim=-1, keepdim=True)  # the last kept value
    keep = torch.empty_like(drop).scatter_(1, order, sorted_s >= cut)
    return keep | (top_p >= 1.0).unsqueeze(1)


def ordered_keys16(x: Tensor) -> Tensor:
    """`top_p_threshold.ordered_key16` of float16/bfloat16 values, int64 of x's shape: their bits
    ordered as the values are (-0 as +0, negatives below positives)."""
    bits = x.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    bits = torch.where(bits == 0x8000, 0, bits)
    return torch.where(bits >= 0x8000, 0xFFFF - bits, bits | 0x8000)


def top_p_min_keys_reference(logits: Tensor, n_valid: int, temperature: Tensor, top_p: Tensor) -> Tensor:
    """Each row's smallest 16-bit key (`ordered_keys16` of its float16/bfloat16 logits) among the
    ids of its top-p set [B] int64."""
    x = logits[:, :n_valid]
    keep = top_p_keep(x.to(torch.float32) / temperature.unsqueeze(1), top_p)
    return torch.where(keep, ordered_keys16(x), 1 << 16).amin(dim=-1)


def token_sample_reference(logits: Tensor, n_valid: int, temperature: Tensor, greedy: Tensor, seeds: Tensor,
                           steps: Tensor, top_p: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Returns (token_ids [B] int64, logprobs [B] float32). temperature [B] float32 (any positive
    value on greedy rows), greedy [B] bool, seeds and steps [B] int64, top_p [B] float32 or None."""
    x = logits[:, :n_valid].to(torch.float32)
    scaled = x / temperature.unsqueeze(1)
    if top_p is not None:
        scaled = scaled.masked_fill(~top_p_keep(scaled, top_p), float("-inf"))
    sampled = (scaled.softmax(dim=-1) / exponential_noise(seeds, steps, n_valid)).argmax(dim=-1)
    token_ids = torch.where(greedy, x.argmax(dim=-1), sampled)
    logprobs = torch.log_softmax(x, dim=-1).gather(1, token_ids[:, None]).squeeze(1)
    return token_ids, logprobs
