"""WKV6 decode: one token for each of N sequences, their states updated in place in a slot pool.

Same contract as `kernels.wkv6_reference.wkv6_step`, but the kernel reads each sequence's state
straight out of `state_pool[slots[n]]` and writes the new state back there: no gather, no scatter,
no temporary. One program per (sequence, head, V tile) holds a [K, BV] float32 state tile:

    y[n, h, v]       = sum_k r[k] * S[k, v] + (sum_k r[k] * u[k] * k[k]) * v[v]
    S[k, v] (new)    = exp(w[k]) * S[k, v] + k[k] * v[v]

Each state element is read once and written once, so at large batch the kernel moves
2 * N * H * K * V * 4 bytes plus the inputs; at batch 1 it is launch-bound.
"""
from __future__ import annotations

import functools

import torch

import triton
import triton.language as tl
from torch import Tensor

from .wkv6_checks import check_wkv_inputs


@triton.jit
def wkv6_decode_fwd_kernel(
    r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, y_ptr, state_ptr, slots_ptr,
    stride_rn, stride_rh, stride_kn, stride_kh, stride_wn, stride_wh,  # token / head strides
    stride_vn, stride_vh,  # (every last dim is contiguous)
    stride_yn, stride_yh,  # y
    stride_ss, stride_sh,  # state_pool [S, H, K, V]: slot and head strides (K, V contiguous)
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    i_n, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V

    slot = tl.load(slots_ptr + i_n).to(tl.int64)
    i_n64 = i_n.to(tl.int64)
    b_r = tl.load(r_ptr + i_n64 * stride_rn + i_h * stride_rh + o_k, mask=m_k, other=0.).to(tl.float32)
    b_k = tl.load(k_ptr + i_n64 * stride_kn + i_h * stride_kh + o_k, mask=m_k, other=0.).to(tl.float32)
    b_w = tl.load(w_ptr + i_n64 * stride_wn + i_h * stride_wh + o_k, mask=m_k, other=0.).to(tl.float32)
    b_u = tl.load(u_ptr + i_h * K + o_k, mask=m_k, other=0.).to(tl.float32)
    b_v = tl.load(v_ptr + i_n.to(tl.int64) * stride_vn + i_h * stride_vh + o_v, mask=m_v, other=0.).to(tl.float32)

    p_s = state_ptr + slot * stride_ss + i_h * stride_sh + o_k[:, None] * V + o_v[None, :]
    m_s = m_k[:, None] & m_v[None, :]
    b_s = tl.load(p_s, mask=m_s, other=0.)

    # y = r . (S + diag(u) k v^T); the bonus term factorises into a scalar times v
    b_y = tl.sum(b_r[:, None] * b_s, axis=0) + tl.sum(b_r * b_u * b_k) * b_v
    b_s = tl.exp(b_w)[:, None] * b_s + b_k[:, None] * b_v[None, :]

    tl.store(p_s, b_s, mask=m_s)
    tl.store(y_ptr + i_n.to(tl.int64) * stride_yn + i_h * stride_yh + o_v,
             b_y.to(y_ptr.dtype.element_ty), mask=m_v)


@functools.lru_cache(maxsize=None)
def _config(N: int, H: int, K: int, V: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BK, BV, V tiles, num_warps): wide V tiles when there are enough (sequence, head) pairs to
    fill the chip, narrow ones to spread a small batch over more multiprocessors. Cached: the decode
    path is launch-bound at small batch, and every microsecond of Python counts."""
    BK, BV = triton.next_power_of_2(K), triton.next_power_of_2(V)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        while BV > 16 and N * H * -(-V // BV) < 2 * sms:
            BV //= 2
        BV = min(BV, 64)
    else:
        BV = min(BV, 32)
    return BK, BV, -(-V // BV), 4 if BK * BV >= 2048 else 2


def wkv6_decode_fwd(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state_pool: Tensor,
                    slots: Tensor) -> Tensor:
    """The launcher: inputs already checked; r/k/w/v with a contiguous last dim, u contiguous."""
    N, H, K = r.shape
    V = v.shape[-1]
    y = torch.empty((N, H, V), dtype=r.dtype, device=r.device)
    if N == 0:
        return y
    BK, BV, NV, num_warps = _config(N, H, K, V, r.device)
    rs, ks, ws, vs, ys, ss = r.stride(), k.stride(), w.stride(), v.stride(), y.stride(), state_pool.stride()
    wkv6_decode_fwd_kernel[(N, H, NV)](
        r, k, v, w, u, y, state_pool, slots,
        rs[0], rs[1], ks[0], ks[1], ws[0], ws[1], vs[0], vs[1], ys[0], ys[1], ss[0], ss[1],
        K=K, V=V, BK=BK, BV=BV, num_warps=num_warps,
    )
    return y


def wkv6_decode(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state_pool: Tensor,
                slots: Tensor) -> Tensor:
    """One WKV6 step for N sequences, updating their states in place.

    r, k, w: [N, H, K] (model dtype; `w` is the log decay, <= 0); v: [N, H, V]; u: [H, K];
    state_pool: [S, H, K, V] float32, contiguous in its last three dims; slots: [N] integer,
    distinct (two rows naming one slot would race). Reads `state_pool[slots]`, writes the new states
    into the same slots and returns y [N, H, V] in r's dtype."""
    N, H, K, V = check_wkv_inputs(r, k, v, w, u, state_pool, "N")
    if slots.shape != (N,) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be an integer tensor [N] = [{N}], got {slots.dtype} {tuple(slots.shape)}")
    device = r.device
    if not (k.device == v.device == w.device == u.device == state_pool.device == slots.device == device):
        tensors = (r, k, v, w, u, state_pool, slots)
        raise ValueError(f"all tensors must be on one device; got {[str(t.device) for t in tensors]}")
    if r.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or w.stride(-1) != 1:
        r, k, v, w = (t if t.stride(-1) == 1 else t.contiguous() for t in (r, k, v, w))
    return wkv6_decode_fwd(r, k, v, w, u if u.is_contiguous() else u.contiguous(), state_pool, slots)
