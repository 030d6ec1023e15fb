"""WKV6 prefill: the chunked form over packed variable-length sequences, states in a slot pool.

Sequence b owns tokens [cu_seqlens[b], cu_seqlens[b+1]) of the packed inputs and the state
`state_pool[slots[b]]`, which is read as the initial state and overwritten with the final one.

Two kernels, chunks of BT = 64 tokens split into sub-chunks of BC = 16:

1. `wkv6_prefill_state_fwd_kernel`, one program per (sequence, head, K tile, V tile), walks its
   sequence chunk by chunk, stores the state at each chunk start into `h` [NT, H, K, V] and
   advances it: S <- diag(exp(A_end)) S + (k * exp(A_end - A))^T v, where A is the log decay
   accumulated inside the chunk; every factor is exp(<= 0).
2. `wkv6_prefill_fwd_kernel`, one program per (chunk, V tile, head), all in parallel:
   y = (r * exp(A_before)) h_chunk                      (the carried state)
     + sum over earlier sub-chunks j of (q k_j^T) v_j     (factorised through the boundary after j)
     + the diagonal sub-chunk, each pair (t, s) with its own exp(A_{t-1} - A_s)
     + (r . u . k) v                                     (the current-token bonus).
   For a pair t in sub-chunk i, s in an earlier sub-chunk j, the decay exp(A_{t-1} - A_s) splits
   at the end of sub-chunk j into exp(A_{t-1} - A_ref) * exp(A_ref - A_s), both <= 1, so nothing
   overflows however strong the decays are; inside a sub-chunk each pair gets its own exponent, as in
   `wkv6_chunked`. The accumulated decays are summed in float64 (as the reference does) and only
   their differences, all <= 0, are rounded to float32; products accumulate in float32.
"""
from __future__ import annotations

import functools
import warnings
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

BT = 64  # chunk: the state is materialised once per chunk
BC = 16  # sub-chunk: the granularity of the intra-chunk products
BD = 16  # key channels per step of the diagonal sub-chunk's pairwise decays


@triton.jit
def wkv6_prefill_state_fwd_kernel(
    k_ptr, v_ptr, w_ptr, h_ptr, state_ptr, slots_ptr, cu_ptr, chunk_offsets_ptr,
    stride_kt, stride_kh, stride_wt, stride_wh, stride_vt, stride_vh, stride_ss, stride_sh,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr, F64: tl.constexpr,
):
    i_bh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    bos = tl.load(cu_ptr + i_b).to(tl.int64)
    eos = tl.load(cu_ptr + i_b + 1).to(tl.int64)
    boc = tl.load(chunk_offsets_ptr + i_b).to(tl.int64)
    slot = tl.load(slots_ptr + i_b).to(tl.int64)

    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    p_s = state_ptr + slot * stride_ss + i_h * stride_sh + o_kv
    b_s = tl.load(p_s, mask=m_kv, other=0.)

    o_t = tl.arange(0, BT)
    n_chunks = tl.cdiv(eos - bos, BT)
    for i_t in range(0, n_chunks):
        tl.store(h_ptr + ((boc + i_t) * H + i_h) * (K * V) + o_kv, b_s, mask=m_kv)
        rows = bos + i_t * BT + o_t
        m_t = rows < eos
        m_tk = m_t[:, None] & m_k[None, :]
        b_k = tl.load(k_ptr + rows[:, None] * stride_kt + i_h * stride_kh + o_k[None, :], mask=m_tk, other=0.)
        b_w = tl.load(w_ptr + rows[:, None] * stride_wt + i_h * stride_wh + o_k[None, :], mask=m_tk, other=0.)
        b_v = tl.load(v_ptr + rows[:, None] * stride_vt + i_h * stride_vh + o_v[None, :],
                      mask=m_t[:, None] & m_v[None, :], other=0.)
        if F64:
            b_w = b_w.to(tl.float64)
        else:
            b_w = b_w.to(tl.float32)
        b_A = tl.cumsum(b_w, axis=0)  # decay accumulated through each token, inclusive
        b_A_end = tl.sum(b_w, axis=0)
        # each token's k decayed to the chunk end: exp(A_end - A_s) <= 1
        b_kd = b_k.to(tl.float32) * tl.exp((b_A_end[None, :] - b_A).to(tl.float32))
        b_s = b_s * tl.exp(b_A_end.to(tl.float32))[:, None]
        b_s += tl.dot(tl.trans(b_kd), b_v.to(tl.float32), input_precision=PRECISION)
    tl.store(p_s, b_s, mask=m_kv)


@triton.jit
def wkv6_prefill_fwd_kernel(
    r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, y_ptr, h_ptr, cu_ptr, chunk_indices_ptr,
    stride_rt, stride_rh, stride_kt, stride_kh, stride_wt, stride_wh, stride_vt, stride_vh,
    stride_yt, stride_yh,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
    PRECISION: tl.constexpr, F64: tl.constexpr,
):
    i_c, i_v, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = tl.load(chunk_indices_ptr + 2 * i_c)
    i_t = tl.load(chunk_indices_ptr + 2 * i_c + 1).to(tl.int64)
    bos = tl.load(cu_ptr + i_b).to(tl.int64)
    eos = tl.load(cu_ptr + i_b + 1).to(tl.int64)
    t0 = bos + i_t * BT

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_c = tl.arange(0, BC)
    m_k, m_v = o_k < K, o_v < V
    b_h = tl.load(h_ptr + (i_c.to(tl.int64) * H + i_h) * (K * V) + o_k[:, None] * V + o_v[None, :],
                  mask=m_k[:, None] & m_v[None, :], other=0.)
    b_u = tl.load(u_ptr + i_h * K + o_k, mask=m_k, other=0.).to(tl.float32)

    n_sub = tl.cdiv(tl.minimum(eos - t0, BT), BC)
    for i in range(0, n_sub):
        rows = t0 + i * BC + o_c
        m_t = rows < eos
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_r = tl.load(r_ptr + rows[:, None] * stride_rt + i_h * stride_rh + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        b_k = tl.load(k_ptr + rows[:, None] * stride_kt + i_h * stride_kh + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        b_w = tl.load(w_ptr + rows[:, None] * stride_wt + i_h * stride_wh + o_k[None, :], mask=m_tk, other=0.)
        b_v = tl.load(v_ptr + rows[:, None] * stride_vt + i_h * stride_vh + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)
        if F64:
            b_w = b_w.to(tl.float64)
        else:
            b_w = b_w.to(tl.float32)
        b_A = tl.cumsum(b_w, axis=0)  # from the sub-chunk start through each token
        b_Ab = b_A - b_w  # ... through the token before
        b_q = b_r * tl.exp(b_Ab.to(tl.float32))
        b_y = tl.zeros([BC, BV], dtype=tl.float32)

        # earlier sub-chunks of this chunk, nearest first; b_D sums the decays of the sub-chunks
        # strictly between j and i
        b_D = tl.zeros([BK], dtype=b_w.dtype)
        for jj in range(0, i):
            j = i - 1 - jj
            rows_j = t0 + j * BC + o_c  # all inside the sequence: sub-chunk i starts after them
            b_kj = tl.load(k_ptr + rows_j[:, None] * stride_kt + i_h * stride_kh + o_k[None, :],
                           mask=m_k[None, :], other=0.).to(tl.float32)
            b_wj = tl.load(w_ptr + rows_j[:, None] * stride_wt + i_h * stride_wh + o_k[None, :],
                           mask=m_k[None, :], other=0.).to(b_w.dtype)
            b_vj = tl.load(v_ptr + rows_j[:, None] * stride_vt + i_h * stride_vh + o_v[None, :],
                           mask=m_v[None, :], other=0.).to(tl.float32)
            b_sum_j = tl.sum(b_wj, axis=0)
            # exp(A_ref - A_s), A_ref the decay through the end of sub-chunk i-1, and the
            # sub-chunks between: everything up to the row of sub-chunk i (where b_q takes over)
            b_kdj = b_kj * tl.exp(((b_D + b_sum_j)[None, :] - tl.cumsum(b_wj, axis=0)).to(tl.float32))
            b_att = tl.dot(b_q, tl.trans(b_kdj), input_precision=PRECISION)
            b_y += tl.dot(b_att, b_vj, input_precision=PRECISION)
            b_D += b_sum_j

        # the state carried into the chunk, decayed from the chunk start: b_D now sums all earlier
        # sub-chunks
        b_y += tl.dot(b_r * tl.exp((b_D[None, :] + b_Ab).to(tl.float32)), b_h, input_precision=PRECISION)

        # the diagonal sub-chunk: pairs s < t, each with its own decay exp(A_{t-1} - A_s), taken
        # BD key channels at a time as a [t, s, BD] block
        b_att = tl.zeros([BC, BC], dtype=tl.float32)
        m_ts = (o_c[:, None] > o_c[None, :])[:, :, None]
        for i_d in range(0, tl.cdiv(K, BD)):
            o_d = i_d * BD + tl.arange(0, BD)
            m_td = m_t[:, None] & (o_d < K)[None, :]
            b_rd = tl.load(r_ptr + rows[:, None] * stride_rt + i_h * stride_rh + o_d[None, :], mask=m_td, other=0.).to(tl.float32)
            b_kd = tl.load(k_ptr + rows[:, None] * stride_kt + i_h * stride_kh + o_d[None, :], mask=m_td, other=0.).to(tl.float32)
            b_wd = tl.load(w_ptr + rows[:, None] * stride_wt + i_h * stride_wh + o_d[None, :], mask=m_td, other=0.).to(b_w.dtype)
            b_Ad = tl.cumsum(b_wd, axis=0)
            b_diff = (b_Ad - b_wd)[:, None, :] - b_Ad[None, :, :]  # A_{t-1} - A_s
            b_e = tl.where(m_ts, tl.exp(tl.minimum(b_diff, 0.).to(tl.float32)), 0.)
            b_att += tl.sum(b_rd[:, None, :] * b_e * b_kd[None, :, :], axis=2)
        b_y += tl.dot(b_att, b_v, input_precision=PRECISION)

        # the current token's bonus
        b_y += tl.sum(b_r * b_u[None, :] * b_k, axis=1)[:, None] * b_v
        tl.store(y_ptr + rows[:, None] * stride_yt + i_h * stride_yh + o_v[None, :],
                 b_y.to(y_ptr.dtype.element_ty), mask=m_tv)


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# float64 prefix sums of the log decays; turned off (with a warning) if a Triton build cannot
# compile them, in which case float32 sums are used (exact for ordinary decays)
_USE_F64 = [True]


def _launch(kernel, grid, *args, **kwargs) -> None:
    try:
        kernel[grid](*args, F64=_USE_F64[0], **kwargs)
    except Exception as e:  # compile-time failure: nothing ran yet
        if not _USE_F64[0]:
            raise
        warnings.warn(f"wkv6_prefill: float64 decay sums failed to compile ({type(e).__name__}: "
                      f"{str(e)[:200]}); using float32")
        _USE_F64[0] = False
        kernel[grid](*args, F64=False, **kwargs)


def _precision(dtype: torch.dtype) -> str:
    """Matrix-unit precision of the in-kernel products: IEEE float32 for float32 inputs; for 16-bit
    inputs three tf32 passes (about float32 accuracy, on the tensor cores)."""
    return "ieee" if dtype == torch.float32 else "tf32x3"


def _chunk_tables(lens: list[int], device: torch.device) -> tuple[Tensor, Tensor, int]:
    n_chunks = torch.tensor([(n + BT - 1) // BT for n in lens], dtype=torch.int64)
    chunk_offsets = torch.zeros(len(lens) + 1, dtype=torch.int64)
    torch.cumsum(n_chunks, 0, out=chunk_offsets[1:])
    NT = int(chunk_offsets[-1])
    seq = torch.repeat_interleave(torch.arange(len(lens)), n_chunks)
    within = torch.arange(NT) - chunk_offsets[:-1].repeat_interleave(n_chunks)
    chunk_indices = torch.stack([seq, within], 1).to(torch.int32)
    return chunk_offsets.to(torch.int32).to(device), chunk_indices.to(device), NT


def wkv6_prefill_fwd(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, lens: list[int],
                     cu_seqlens: Tensor, state_pool: Tensor, slots: Tensor) -> Tensor:
    """The launcher: inputs already checked; every last dim contiguous."""
    T, H, K = r.shape
    V = v.shape[-1]
    B = len(lens)
    y = torch.empty((T, H, V), dtype=r.dtype, device=r.device)
    if B == 0:
        return y
    chunk_offsets, chunk_indices, NT = _chunk_tables(lens, r.device)
    h = torch.empty((max(NT, 1), H, K, V), dtype=torch.float32, device=r.device)
    precision = _precision(r.dtype)
    BKf = triton.next_power_of_2(K)

    # state pass: spread over K and V tiles until the chip is busy
    BK, BV = min(BKf, 64), min(triton.next_power_of_2(V), 64)
    sms = _num_sms(r.device.index if r.device.index is not None else torch.cuda.current_device()) \
        if r.is_cuda else 1
    while B * H * triton.cdiv(K, BK) * triton.cdiv(V, BV) < sms and max(BK, BV) > 16:
        if BV >= BK:
            BV //= 2
        else:
            BK //= 2
    _launch(wkv6_prefill_state_fwd_kernel, (B * H, triton.cdiv(K, BK), triton.cdiv(V, BV)),
            k, v, w, h, state_pool, slots, cu_seqlens, chunk_offsets,
            k.stride(0), k.stride(1), w.stride(0), w.stride(1), v.stride(0), v.stride(1),
            state_pool.stride(0), state_pool.stride(1),
            H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, PRECISION=precision, num_warps=4)
    if NT == 0:
        return y

    # output pass: every chunk in parallel, the whole K per program
    BV = min(triton.next_power_of_2(V), 64 if BKf <= 64 else 32)
    _launch(wkv6_prefill_fwd_kernel, (NT, triton.cdiv(V, BV), H),
            r, k, v, w, u, y, h, cu_seqlens, chunk_indices,
            r.stride(0), r.stride(1), k.stride(0), k.stride(1), w.stride(0), w.stride(1),
            v.stride(0), v.stride(1), y.stride(0), y.stride(1),
            H=H, K=K, V=V, BT=BT, BC=BC, BK=BKf, BV=BV, BD=min(BKf, BD), PRECISION=precision, num_warps=4)
    return y


def wkv6_prefill(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor,
                 cu_seqlens: Tensor | Sequence[int], state_pool: Tensor, slots: Tensor) -> Tensor:
    """WKV6 over B packed sequences, their states read from and written back to a slot pool.

    r, k, w: [T, H, K] (all sequences' tokens packed; `w` is the log decay, <= 0); v: [T, H, V];
    u: [H, K]; cu_seqlens: [B + 1] (tensor or ints) with cu_seqlens[0] = 0, non-decreasing,
    cu_seqlens[B] = T; state_pool: [S, H, K, V] float32, contiguous in [K, V]; slots: [B] integer,
    distinct. Sequence b is tokens cu_seqlens[b]:cu_seqlens[b+1], starting from state
    `state_pool[slots[b]]`, which receives its final state. Returns y [T, H, V] in r's dtype.
    (A tensor cu_seqlens on the GPU is read back to the host once, to size the chunk tables.)"""
    if r.dim() != 3 or k.shape != r.shape or w.shape != r.shape:
        raise ValueError(f"r, k, w must be [T, H, K]; got r {tuple(r.shape)}, k {tuple(k.shape)}, w {tuple(w.shape)}")
    T, H, K = r.shape
    if v.dim() != 3 or v.shape[:2] != (T, H):
        raise ValueError(f"v must be [T, H, V] = [{T}, {H}, V]; got {tuple(v.shape)}")
    V = v.shape[-1]
    if u.shape != (H, K):
        raise ValueError(f"u must be [H, K] = {(H, K)}, got {tuple(u.shape)}")
    if state_pool.dtype != torch.float32 or state_pool.dim() != 4 or state_pool.shape[1:] != (H, K, V):
        raise ValueError(f"state_pool must be float32 [S, H, K, V] = [S, {H}, {K}, {V}]; "
                         f"got {state_pool.dtype} {tuple(state_pool.shape)}")
    if state_pool.stride(3) != 1 or state_pool.stride(2) != V:
        raise ValueError("state_pool must be contiguous in its [K, V] dims")
    cu = [int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else cu_seqlens)]
    if not cu or cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must start at 0, not decrease and end at T = {T}; got {cu[:8]}...")
    B = len(cu) - 1
    if slots.shape != (B,) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be an integer tensor [B] = [{B}], got {slots.dtype} {tuple(slots.shape)}")
    tensors = (r, k, v, w, u, state_pool, slots)
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all tensors must be on one device; got {[str(t.device) for t in tensors]}")
    r, k, v, w = (t if t.stride(-1) == 1 else t.contiguous() for t in (r, k, v, w))
    cu_t = torch.tensor(cu, dtype=torch.int32, device=r.device)
    lens = [b - a for a, b in zip(cu, cu[1:])]
    return wkv6_prefill_fwd(r, k, v, w, u.contiguous(), lens, cu_t, state_pool, slots)
