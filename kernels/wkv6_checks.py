"""Input checks shared by the WKV6 kernels' public functions (decode and prefill)."""
from __future__ import annotations

import torch
from torch import Tensor


def check_wkv_inputs(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state_pool: Tensor,
                     rows: str) -> tuple[int, int, int, int]:
    """r, k, w [rows, H, K], v [rows, H, V], u [H, K], state_pool float32 [S, H, K, V] contiguous in
    [K, V]. Returns (rows, H, K, V); raises ValueError naming the first tensor that is off."""
    if r.dim() != 3 or k.shape != r.shape or w.shape != r.shape:
        raise ValueError(f"r, k, w must be [{rows}, H, K]; got r {tuple(r.shape)}, k {tuple(k.shape)}, "
                         f"w {tuple(w.shape)}")
    n, H, K = r.shape
    if v.dim() != 3 or v.shape[:2] != (n, H):
        raise ValueError(f"v must be [{rows}, H, V] = [{n}, {H}, V]; got {tuple(v.shape)}")
    V = v.shape[-1]
    if u.shape != (H, K):
        raise ValueError(f"u must be [H, K] = {(H, K)}, got {tuple(u.shape)}")
    if state_pool.dtype != torch.float32 or state_pool.dim() != 4 or state_pool.shape[1:] != (H, K, V):
        raise ValueError(f"state_pool must be float32 [S, H, K, V] = [S, {H}, {K}, {V}]; "
                         f"got {state_pool.dtype} {tuple(state_pool.shape)}")
    if state_pool.stride(3) != 1 or state_pool.stride(2) != V:
        raise ValueError("state_pool must be contiguous in its [K, V] dims")
    return n, H, K, V
