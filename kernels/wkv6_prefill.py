"""WKV6 prefill: the chunked form over packed variable-length sequences, states in a slot pool.

Sequence b owns tokens [cu_seqlens[b], cu_seqlens[b+1]) of the packed inputs and the state
`state_pool[slots[b]]`, which is read as the initial state and overwritten with the final one.

Chunks of BT = 64 tokens, split into sub-chunks of BC = 16; three kernels, only the second of which
walks a sequence, and it only streams:

1. `wkv6_prefill_chunk_fwd_kernel`, one program per (chunk, head, V tile): what the chunk adds to
   the state, dS = sum_s (k_s exp(sum_{j>s} w_j)) v_s^T, into `h`, and its decay exp(sum w).
2. `wkv6_prefill_scan_fwd_kernel`, one program per (sequence, head, K tile): S <- decay * S + dS
   chunk by chunk, several chunks' loads in flight, leaving in `h` the state at each chunk start
   and the final state in the pool.
3. `wkv6_prefill_fwd_kernel`, one program (one warp) per (chunk, head, sub-chunk):
   y_t = (r_t exp(sum_{j<t} w_j)) h_chunk + sum_{s<t} att[t, s] v_s + (r_t . u . k_t) v_t, with
   att[t, s] = sum_k r_tk exp(sum_{s<j'<t} w_j'k) k_sk built in registers: for s in an earlier
   sub-chunk the decay splits at this sub-chunk's start into two factors <= 1, one for t and one for
   s, and each earlier sub-chunk's block is one matrix product; within the sub-chunk each pair gets
   its own exponent (`wkv6_prefill_diagonal`). Until session 7 att went through memory: a kernel
   with a program per 16 x 16 block of it, then this one per chunk (H100, one layer, 2,048 tokens:
   205 -> 160 us for all three kernels; 64K 6.7 -> 5.4 ms).

Exactness: w <= 0, so a sum of w's is always well conditioned; only the difference of two prefix
sums (A_{t-1} - A_s) loses digits when they are large. Every exponent here is summed directly over
the tokens it spans (scans over w shifted by one token, or products of w with 0/1 matrices, in
float32 IEEE arithmetic) and never taken as a difference, which is as exact as the reference's
float64 prefix sums, and never positive, so nothing overflows. Products accumulate in float32;
matrix products of 16-bit inputs use one tf32 pass (`_precision`), of float32 inputs three.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

import triton
import triton.language as tl
from torch import Tensor

from .wkv6_checks import check_wkv_inputs
from .wkv6_prefill_diagonal import diagonal_block_cube, diagonal_block_walk
from .wkv6_plan import BT, ChunkPlan, chunk_tables, to_device

BC = 16  # sub-chunk: the blocks of the intra-chunk attention
BD = 16  # key channels per step of a diagonal block's pairwise decays


@triton.jit
def wkv6_prefill_chunk_fwd_kernel(
    k_ptr, v_ptr, w_ptr, h_ptr, decay_ptr, cu_ptr, chunk_indices_ptr,
    stride_kt, stride_kh, stride_wt, stride_wh, stride_vt, stride_vh,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_c, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = tl.load(chunk_indices_ptr + 2 * i_c)
    i_t = tl.load(chunk_indices_ptr + 2 * i_c + 1).to(tl.int64)
    bos = tl.load(cu_ptr + i_b).to(tl.int64)
    eos = tl.load(cu_ptr + i_b + 1).to(tl.int64)
    o_t = tl.arange(0, BT)
    rows = bos + i_t * BT + o_t
    m_t = rows < eos
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    b_k = tl.load(k_ptr + rows[:, None] * stride_kt + i_h * stride_kh + o_k[None, :],
                  mask=m_t[:, None] & m_k[None, :], other=0.)
    b_wn = tl.load(w_ptr + (rows + 1)[:, None] * stride_wt + i_h * stride_wh + o_k[None, :],
                   mask=((o_t < BT - 1) & (rows + 1 < eos))[:, None] & m_k[None, :], other=0.)
    b_v = tl.load(v_ptr + rows[:, None] * stride_vt + i_h * stride_vh + o_v[None, :],
                  mask=m_t[:, None] & m_v[None, :], other=0.)
    # each token's k decayed to the chunk end: exp(sum of the w after it) <= 1
    b_kd = b_k.to(tl.float32) * tl.exp(tl.cumsum(b_wn.to(tl.float32), axis=0, reverse=True))
    b_ds = tl.dot(tl.trans(b_kd), b_v.to(tl.float32), input_precision=PRECISION)
    p_h = h_ptr + (i_c.to(tl.int64) * H + i_h) * (K * V) + o_k[:, None] * V + o_v[None, :]
    tl.store(p_h, b_ds, mask=m_k[:, None] & m_v[None, :])
    if i_v == 0:
        b_w = tl.load(w_ptr + rows[:, None] * stride_wt + i_h * stride_wh + o_k[None, :],
                      mask=m_t[:, None] & m_k[None, :], other=0.)
        tl.store(decay_ptr + (i_c.to(tl.int64) * H + i_h) * K + o_k, tl.exp(tl.sum(b_w.to(tl.float32), axis=0)),
                 mask=m_k)


@triton.jit
def wkv6_prefill_scan_fwd_kernel(
    h_ptr, decay_ptr, state_ptr, slots_ptr, cu_ptr, chunk_offsets_ptr, stride_ss, stride_sh,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    i_bh, i_k = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bos = tl.load(cu_ptr + i_b)
    eos = tl.load(cu_ptr + i_b + 1)
    boc = tl.load(chunk_offsets_ptr + i_b).to(tl.int64)
    slot = tl.load(slots_ptr + i_b).to(tl.int64)
    n_chunks = tl.cdiv(eos - bos, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k = o_k < K
    m_kv = m_k[:, None] & (o_v < V)[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    p_s = state_ptr + slot * stride_ss + i_h * stride_sh + o_kv
    b_s = tl.load(p_s, mask=m_kv, other=0.)
    p_h = h_ptr + (boc * H + i_h) * (K * V) + o_kv  # chunk c at + c * H * K * V
    p_d = decay_ptr + (boc * H + i_h) * K + o_k
    # h holds each chunk's dS on entry and its start state on exit; loads run three chunks ahead
    b_ds0 = tl.load(p_h, mask=m_kv & (n_chunks > 0), other=0.)
    b_d0 = tl.load(p_d, mask=m_k & (n_chunks > 0), other=0.)
    b_ds1 = tl.load(p_h + H * K * V, mask=m_kv & (n_chunks > 1), other=0.)
    b_d1 = tl.load(p_d + H * K, mask=m_k & (n_chunks > 1), other=0.)
    b_ds2 = tl.load(p_h + 2 * H * K * V, mask=m_kv & (n_chunks > 2), other=0.)
    b_d2 = tl.load(p_d + 2 * H * K, mask=m_k & (n_chunks > 2), other=0.)
    for c in range(0, n_chunks):
        # the pointers advance a chunk at a time (64-bit), no chunk index times a stride in 32 bits
        b_ds3 = tl.load(p_h + 3 * H * K * V, mask=m_kv & (c + 3 < n_chunks), other=0.)
        b_d3 = tl.load(p_d + 3 * H * K, mask=m_k & (c + 3 < n_chunks), other=0.)
        tl.store(p_h, b_s, mask=m_kv)
        b_s = b_d0[:, None] * b_s + b_ds0
        p_h += H * K * V
        p_d += H * K
        b_ds0, b_d0, b_ds1, b_d1, b_ds2, b_d2 = b_ds1, b_d1, b_ds2, b_d2, b_ds3, b_d3
    tl.store(p_s, b_s, mask=m_kv)


@triton.jit
def wkv6_prefill_fwd_kernel(
    r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, y_ptr, h_ptr, cu_ptr, chunk_indices_ptr,
    stride_rt, stride_rh, stride_kt, stride_kh, stride_wt, stride_wh, stride_vt, stride_vh,
    stride_yt, stride_yh,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
    PRECISION: tl.constexpr, DIAG_PRODUCTS: tl.constexpr, DIAG_WALK: tl.constexpr, DIAG_UNROLL: tl.constexpr,
):
    i_c, i_h, i_i = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = tl.load(chunk_indices_ptr + 2 * i_c)
    i_t = tl.load(chunk_indices_ptr + 2 * i_c + 1).to(tl.int64)
    bos = tl.load(cu_ptr + i_b).to(tl.int64)
    eos = tl.load(cu_ptr + i_b + 1).to(tl.int64)
    t0 = bos + i_t * BT
    start = t0 + i_i * BC  # this program's sub-chunk: tokens start .. start + BC
    if start >= eos:
        return
    o_c = tl.arange(0, BC)
    rows = start + o_c
    m_t = rows < eos
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_tk = m_t[:, None] & m_k[None, :]
    m_tv = m_t[:, None] & m_v[None, :]

    b_r = tl.load(r_ptr + rows[:, None] * stride_rt + i_h * stride_rh + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    # w of the token before, within the sub-chunk: its scan is sum_{start <= j < t} w_j
    b_wp = tl.load(w_ptr + (rows - 1)[:, None] * stride_wt + i_h * stride_wh + o_k[None, :],
                   mask=m_tk & (o_c >= 1)[:, None], other=0.)
    b_q = b_r * tl.exp(tl.cumsum(b_wp.to(tl.float32), axis=0))  # r_t decayed back to `start`
    # the earlier sub-chunks of the chunk, nearest first (all inside the sequence: they precede
    # `start`): att[t, s] = q_t . k_s exp(sum_{s<j<start} w_j), the exponent the sum of the w after s
    # within its sub-chunk plus the sum of the whole sub-chunks between (direct sums, <= 0)
    sel_after = (o_c[None, :] > o_c[:, None]).to(tl.float32)  # [s, j]: j after s
    b_between = tl.zeros([BK], dtype=tl.float32)
    b_y = tl.zeros([BC, BV], dtype=tl.float32)
    for jj in range(0, i_i):
        rows_j = start - (jj + 1) * BC + o_c
        b_wj = tl.load(w_ptr + rows_j[:, None] * stride_wt + i_h * stride_wh + o_k[None, :],
                       mask=m_k[None, :], other=0.).to(tl.float32)
        b_kj = tl.load(k_ptr + rows_j[:, None] * stride_kt + i_h * stride_kh + o_k[None, :],
                       mask=m_k[None, :], other=0.).to(tl.float32)
        b_vj = tl.load(v_ptr + rows_j[:, None] * stride_vt + i_h * stride_vh + o_v[None, :],
                       mask=m_v[None, :], other=0.).to(tl.float32)
        b_ek = tl.dot(sel_after, b_wj, input_precision="ieee") + b_between[None, :]
        b_att = tl.dot(b_q, tl.trans(b_kj * tl.exp(b_ek)), input_precision=PRECISION)
        b_y += tl.dot(b_att, b_vj, input_precision=PRECISION)
        b_between += tl.sum(b_wj, axis=0)
    # the state at the chunk start, read by r_t decayed back to it: two factors <= 1 (b_between now
    # sums the whole chunk before `start`)
    b_h = tl.load(h_ptr + (i_c.to(tl.int64) * H + i_h) * (K * V) + o_k[:, None] * V + o_v[None, :],
                  mask=m_k[:, None] & m_v[None, :], other=0.)
    b_y += tl.dot(b_q * tl.exp(b_between)[None, :], b_h, input_precision=PRECISION)
    b_v = tl.load(v_ptr + rows[:, None] * stride_vt + i_h * stride_vh + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)
    if DIAG_WALK:
        b_att_d = diagonal_block_walk(r_ptr, k_ptr, w_ptr, start, eos, i_h, stride_rt, stride_rh, stride_kt,
                                      stride_kh, stride_wt, stride_wh, K, BC, BK, DIAG_UNROLL)
    else:
        b_att_d = diagonal_block_cube(r_ptr, k_ptr, w_ptr, rows, m_t, i_h, stride_rt, stride_rh, stride_kt,
                                      stride_kh, stride_wt, stride_wh, K, BC, BD, DIAG_PRODUCTS)
    b_y += tl.dot(b_att_d, b_v, input_precision=PRECISION)
    # the current token's bonus
    b_k = tl.load(k_ptr + rows[:, None] * stride_kt + i_h * stride_kh + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    b_u = tl.load(u_ptr + i_h * K + o_k, mask=m_k, other=0.).to(tl.float32)
    b_y += tl.sum(b_r * b_u[None, :] * b_k, axis=1)[:, None] * b_v
    tl.store(y_ptr + rows[:, None] * stride_yt + i_h * stride_yh + o_v[None, :], b_y.to(y_ptr.dtype.element_ty), mask=m_tv)


@dataclass(frozen=True)
class PrefillTuning:
    """Launch choices of the prefill kernels that do not change what they compute beyond rounding
    (`bench_wkv6.py --sections variants` sweeps them; defaults: the fastest on an H100, session 7)."""

    precision: str | None = None  # matrix-unit precision of the products; None: `_precision(dtype)`
    diag_walk: bool = True  # diagonal blocks row by row (`wkv6_prefill_diagonal`), else as [t, s, BD]
    diag_channels: int = BD  # key channels per step of a [t, s, BD] diagonal block
    diag_products: bool = True  # its decays as running products of exp(w) (H100: 3% faster)
    # warps of the output kernel (its programs are small and serial: one warp was 1.4x faster than
    # four at 2,048 tokens) and of the chunk-state kernel
    num_warps: int = 1
    chunk_warps: int = 4
    # for the next sweep (not yet timed): the row walk as a loop instead of unrolled, and a cap on
    # the output kernel's registers a thread (None: the compiler's choice; at one warp it takes 255)
    diag_unroll: bool = True
    max_registers: int | None = None


def _precision(dtype: torch.dtype) -> str:
    """Matrix-unit precision of the in-kernel products. For 16-bit inputs one tf32 pass: its error
    (~1e-3 relative on y, 3e-4 on the state, H100 at 64K) is below the rounding of a bf16 output,
    and it is 1.3x faster than three passes; for float32 inputs three tf32 passes (about float32
    accuracy, on the tensor cores: IEEE float32 products cost more registers than the 64 x 64 tiles
    leave and spill)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def wkv6_prefill_fwd(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, lens: list[int],
                     cu_seqlens: Tensor, state_pool: Tensor, slots: Tensor,
                     tuning: PrefillTuning = PrefillTuning(), plan: ChunkPlan | None = None) -> Tensor:
    """The launcher: inputs already checked; every last dim contiguous. With `plan`, its tables
    (`lens` then gives only the number of sequences)."""
    T, H, K = r.shape
    V = v.shape[-1]
    B = len(lens)
    if plan is None:
        y = torch.empty((T, H, V), dtype=r.dtype, device=r.device)
        if B == 0:
            return y
        chunk_offsets, chunk_indices, NT = chunk_tables(lens, r.device)
    else:  # rows past the plan's length are written by no kernel
        y = torch.zeros((T, H, V), dtype=r.dtype, device=r.device)
        chunk_offsets, chunk_indices, NT = plan.chunk_offsets, plan.chunk_indices, plan.num_chunks
    precision = tuning.precision or _precision(r.dtype)
    BK, BVf = triton.next_power_of_2(K), triton.next_power_of_2(V)
    BV = min(BVf, 64)
    h = torch.empty((max(NT, 1), H, K, V), dtype=torch.float32, device=r.device)
    decay = torch.empty((max(NT, 1), H, K), dtype=torch.float32, device=r.device)
    if NT:
        wkv6_prefill_chunk_fwd_kernel[(NT, H, -(-V // BV))](
            k, v, w, h, decay, cu_seqlens, chunk_indices,
            k.stride(0), k.stride(1), w.stride(0), w.stride(1), v.stride(0), v.stride(1),
            H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, PRECISION=precision, num_warps=tuning.chunk_warps)
    BKS = min(BK, 8)  # the scan only streams: many narrow programs
    wkv6_prefill_scan_fwd_kernel[(B * H, -(-K // BKS))](
        h, decay, state_pool, slots, cu_seqlens, chunk_offsets, state_pool.stride(0), state_pool.stride(1),
        H=H, K=K, V=V, BT=BT, BK=BKS, BV=BVf, num_warps=2)
    if NT:
        wkv6_prefill_fwd_kernel[(NT, H, BT // BC)](
            r, k, v, w, u, y, h, cu_seqlens, chunk_indices,
            r.stride(0), r.stride(1), k.stride(0), k.stride(1), w.stride(0), w.stride(1),
            v.stride(0), v.stride(1), y.stride(0), y.stride(1),
            H=H, K=K, V=V, BT=BT, BC=BC, BK=BK, BV=BVf, BD=min(BK, tuning.diag_channels), PRECISION=precision,
            DIAG_PRODUCTS=tuning.diag_products, DIAG_WALK=tuning.diag_walk, DIAG_UNROLL=tuning.diag_unroll,
            num_warps=tuning.num_warps, **({"maxnreg": tuning.max_registers} if tuning.max_registers else {}))
    return y


def wkv6_prefill(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor,
                 cu_seqlens: Tensor | Sequence[int] | ChunkPlan, state_pool: Tensor, slots: Tensor,
                 tuning: PrefillTuning = PrefillTuning()) -> Tensor:
    """WKV6 over B packed sequences, their states read from and written back to a slot pool.

    r, k, w: [T, H, K] (all sequences' tokens packed; `w` is the log decay, <= 0); v: [T, H, V];
    u: [H, K]; cu_seqlens: [B + 1] (tensor or ints) with cu_seqlens[0] = 0, non-decreasing,
    cu_seqlens[B] = T; state_pool: [S, H, K, V] float32, contiguous in [K, V]; slots: [B] integer,
    distinct. Sequence b is tokens cu_seqlens[b]:cu_seqlens[b+1], starting from state
    `state_pool[slots[b]]`, which receives its final state. Returns y [T, H, V] in r's dtype.
    (A tensor cu_seqlens on the GPU is read back to the host once, to size the chunk tables.)
    cu_seqlens may instead be a `ChunkPlan` (one sequence, T = plan.rows, slots [1]): nothing is
    read back or copied from the host, as a CUDA graph needs."""
    T, H, K, V = check_wkv_inputs(r, k, v, w, u, state_pool, "T")
    plan = cu_seqlens if isinstance(cu_seqlens, ChunkPlan) else None
    if plan is not None:
        if plan.rows != T or slots.shape != (1,):
            raise ValueError(f"plan: for {plan.rows} rows and one slot, got T = {T} and slots {tuple(slots.shape)}")
        cu, cu_t = [0, T], plan.cu_seqlens
    else:
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
    if plan is None:
        cu_t = to_device(torch.tensor(cu, dtype=torch.int32), r.device)
    lens = [b - a for a, b in zip(cu, cu[1:])]
    return wkv6_prefill_fwd(r, k, v, w, u.contiguous(), lens, cu_t, state_pool, slots, tuning, plan)
