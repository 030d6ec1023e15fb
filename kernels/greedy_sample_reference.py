"""Greedy sampling of a step's logits (PyTorch reference of `kernels.greedy_sample`).

    token_ids[b] = argmax(logits[b, :n_valid])                      (the first of equal maxima)
    logprobs[b]  = log_softmax(logits[b, :n_valid])[token_ids[b]]   (float32)

logits: [B, V] in any float dtype, read as float32 (exact for bf16/fp16). Ids at or above n_valid
(a model's embedding padded past its tokenizer) are never chosen and are outside the softmax: the
same as the sampler's -inf mask on them. This is `engine.sampler.Sampler` for a batch of greedy rows
without logit_bias, penalties, masks or top log-probabilities, op for op.
"""
from __future__ import annotations

import torch
from torch import Tensor


def greedy_sample_reference(logits: Tensor, n_valid: int) -> tuple[Tensor, Tensor]:
    """Returns (token_ids [B] int64, logprobs [B] float32)."""
    x = logits[:, :n_valid].to(torch.float32)
    token_ids = x.argmax(dim=-1)
    logprobs = torch.log_softmax(x, dim=-1).gather(1, token_ids[:, None]).squeeze(1)
    return token_ids, logprobs
