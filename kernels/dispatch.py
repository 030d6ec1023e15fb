"""Which WKV6 implementation runs: the Triton kernels on CUDA tensors, the PyTorch reference elsewhere.

Set `GOLDFINCH_KERNELS=reference` to force the reference on CUDA as well (debugging, A/B checks).
The Triton modules are imported only when a CUDA tensor first arrives, so the CPU path needs no
Triton and a CPU process never compiles anything.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor

from .wkv6_reference import wkv6_chunked, wkv6_step

ENV_VAR = "GOLDFINCH_KERNELS"


def use_triton(t: Tensor) -> bool:
    """True when `t` lives on a CUDA device and the reference is not forced."""
    return t.is_cuda and os.environ.get(ENV_VAR, "").strip().lower() != "reference"


def wkv_decode(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state_pool: Tensor,
               slots: Tensor) -> Tensor:
    """One token for each of N sequences. r, k, w: [N, H, K]; v: [N, H, V]; u: [H, K];
    state_pool: [S, H, K, V] float32, updated in place at `slots` ([N], distinct).
    Returns y [N, H, V] in r's dtype."""
    if use_triton(r):
        from .wkv6_decode import wkv6_decode

        return wkv6_decode(r, k, v, w, u, state_pool, slots)
    return wkv6_step(r, k, v, w, u, state_pool, slots)


def wkv_prefill(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, cu_seqlens: Tensor | Sequence[int],
                state_pool: Tensor, slots: Tensor) -> Tensor:
    """B packed sequences. r, k, w: [T, H, K]; v: [T, H, V]; u: [H, K]; cu_seqlens: [B + 1];
    state_pool: [S, H, K, V] float32, read at and written back to `slots` ([B], distinct).
    Returns y [T, H, V] in r's dtype."""
    if use_triton(r):
        from .wkv6_prefill import wkv6_prefill

        return wkv6_prefill(r, k, v, w, u, cu_seqlens, state_pool, slots)
    cu = [int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else cu_seqlens)]
    if len(cu) != slots.shape[0] + 1:
        raise ValueError(f"cu_seqlens has {len(cu)} entries for {slots.shape[0]} slots")
    y = torch.empty(v.shape, dtype=r.dtype, device=r.device)
    for b, (start, end) in enumerate(zip(cu, cu[1:])):
        if end == start:
            continue
        sl, slot = slice(start, end), slots[b]
        out, state = wkv6_chunked(r[sl][None], k[sl][None], v[sl][None], w[sl][None], u, state_pool[slot][None])
        state_pool[slot] = state[0]
        y[sl] = out[0]
    return y
