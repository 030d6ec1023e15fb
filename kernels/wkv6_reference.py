"""WKV6 (the Finch / RWKV-6 recurrence) in plain PyTorch: the definition and the CPU paths.

For each head, with a state S of shape [K, V] (key channels x value channels):

    y_t = r_t . (S + diag(u) k_t v_t^T)
    S   = diag(exp(w_t)) S + k_t v_t^T

`w` is the log of the decay (the reference code's `exp(-exp(w_raw))` is `exp(w)` with
`w = -exp(w_raw)`), as in flash-linear-attention. States are float32 and laid out [B, H, K, V] (fla's
layout; the reference CUDA kernel keeps the transpose). All arithmetic is float32 whatever the input
dtype; outputs take the dtype of `r`.

Three forms that agree with each other:
- `wkv6_sequential`: the recurrence token by token (the definition, for tests);
- `wkv6_chunked`: the parallel form for prompts, exact and overflow-free: within a chunk, every pair
  (t, s) gets its own decay `exp(A_{t-1} - A_s) <= 1` instead of the usual factorisation through
  `exp(-A_s)`, which overflows when decays are strong;
- `wkv6_step`: one token for many sequences, reading and updating states from a slot pool.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _check(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor) -> None:
    if not (r.shape == k.shape == w.shape) or r.shape[:-1] != v.shape[:-1] or r.dim() != 4:
        raise ValueError(f"r, k, w must be [B, T, H, K] and v [B, T, H, V]; got r {tuple(r.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}, w {tuple(w.shape)}")
    B, _, H, K = r.shape
    if u.shape != (H, K):
        raise ValueError(f"u must be [H, K] = {(H, K)}, got {tuple(u.shape)}")
    if state.shape != (B, H, K, v.shape[-1]) or state.dtype != torch.float32:
        raise ValueError(f"state must be float32 [B, H, K, V] = {(B, H, K, v.shape[-1])}, "
                         f"got {state.dtype} {tuple(state.shape)}")


def wkv6_sequential(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """r, k, w: [B, T, H, K]; v: [B, T, H, V]; u: [H, K]; state: [B, H, K, V] float32.
    Returns (y [B, T, H, V], final state [B, H, K, V]); `state` is not modified."""
    _check(r, k, v, w, u, state)
    S = state.clone()
    rf, kf, vf, decay, uf = r.float(), k.float(), v.float(), w.float().exp(), u.float()
    ys = []
    for t in range(r.shape[1]):
        kv = kf[:, t, :, :, None] * vf[:, t, :, None, :]  # [B, H, K, V]
        ys.append(torch.einsum("bhk,bhkv->bhv", rf[:, t], S + uf[None, :, :, None] * kv))
        S = decay[:, t, :, :, None] * S + kv
    y = torch.stack(ys, dim=1) if ys else vf.new_zeros(v.shape)
    return y.to(r.dtype), S


def wkv6_chunked(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor,
                 chunk_size: int = 32) -> tuple[Tensor, Tensor]:
    """The chunked parallel form; same shapes and contract as `wkv6_sequential`."""
    _check(r, k, v, w, u, state)
    B, T, H, K = r.shape
    S = state.clone()
    ys = []
    uf = u.float()
    for start in range(0, T, chunk_size):
        sl = slice(start, min(start + chunk_size, T))
        y_chunk, S = _chunk(r[:, sl].float(), k[:, sl].float(), v[:, sl].float(), w[:, sl].float(), uf, S)
        ys.append(y_chunk)
    y = torch.cat(ys, dim=1) if ys else v.new_zeros(v.shape, dtype=torch.float32)
    return y.to(r.dtype), S


def _chunk(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    """One chunk of L tokens, all float32, [B, L, H, K] inputs."""
    L = r.shape[1]
    # log decay accumulated through token t (inclusive) and t - 1 (exclusive); float64 because the
    # pairwise differences of large accumulated decays would lose their low bits in float32
    A64 = torch.cumsum(w.double(), dim=1)
    A_before64 = A64 - w.double()
    A, A_before = A64.float(), A_before64.float()
    # pairwise decay from token s (after its own write) to the read at token t: exp(A_{t-1} - A_s)
    diff = (A_before64[:, :, None] - A64[:, None, :]).float()  # [B, Lt, Ls, H, K]
    strictly_lower = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
    decay_ts = torch.where(strictly_lower[None, :, :, None, None], diff, float("-inf")).exp()
    scores = torch.einsum("bthk,btshk,bshk->bhts", r, decay_ts, k)
    y = torch.einsum("bhts,bshv->bthv", scores, v)
    y = y + torch.einsum("bthk,hk,bthk->bth", r, u, k)[..., None] * v  # the bonus on the current token
    y = y + torch.einsum("bthk,bhkv->bthv", r * A_before.exp(), S)  # what the carried state holds
    A_end = A[:, -1]  # [B, H, K]
    k_to_end = k * (A64[:, -1:] - A64).float().exp()
    S = A_end.exp()[..., None] * S + torch.einsum("bshk,bshv->bhkv", k_to_end, v)
    return y, S


def wkv6_step(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state_pool: Tensor,
              slots: Tensor) -> Tensor:
    """One token for each of N sequences, their states kept in a slot pool.

    r, k, w: [N, H, K]; v: [N, H, V]; u: [H, K]; state_pool: [S, H, K, V] float32; slots: [N] long,
    distinct. Reads `state_pool[slots]`, writes the updated states back into the same slots, and
    returns y [N, H, V] in r's dtype. (This reference gathers and scatters the N states; the GPU
    kernel updates them in place.)"""
    if r.dim() != 3 or slots.shape != (r.shape[0],):
        raise ValueError(f"r must be [N, H, K] and slots [N]; got {tuple(r.shape)}, {tuple(slots.shape)}")
    if state_pool.dtype != torch.float32 or state_pool.shape[1:3] != r.shape[1:]:
        raise ValueError(f"state_pool must be float32 [S, H, K, V]; got {state_pool.dtype} {tuple(state_pool.shape)}")
    S = state_pool.index_select(0, slots)
    rf, kf, vf = r.float(), k.float(), v.float()
    kv = kf[..., :, None] * vf[..., None, :]
    y = torch.einsum("nhk,nhkv->nhv", rf, S + u.float()[None, :, :, None] * kv)
    state_pool.index_copy_(0, slots, w.float().exp()[..., None] * S + kv)
    return y.to(r.dtype)
