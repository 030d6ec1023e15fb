"""The diagonal blocks of WKV6 prefill's intra-chunk attention (`wkv6_prefill_fwd_kernel`), two ways.

att[t, s] = sum_k r_tk exp(sum_{s<j<t} w_jk) k_sk for the pairs s < t of one sub-chunk of BC tokens.
Between sub-chunks the decay splits into a factor for t and one for s and the block is a matrix
product; within one every pair needs its own exponent, summed directly over the tokens it spans.

- `diagonal_block_walk` (default): row by row, the decayed keys of the rows before as one tile.
- `diagonal_block_cube`: BD channels at a time as a [t, s, BD] tile (3-12% slower on an H100 at
  one warp a program, `bench_wkv6.py --sections variants`).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _walk_row(b_att, b_p, r_ptr, k_ptr, w_ptr, t, start, eos, i_h, stride_rt, stride_rh, stride_kt, stride_kh,
              stride_wt, stride_wh, o_c, o_k, m_k):
    """Row t of a diagonal block: its attention to the rows before, then the decayed keys moved on."""
    row = start + t
    m_row = m_k & (row < eos)
    b_rt = tl.load(r_ptr + row * stride_rt + i_h * stride_rh + o_k, mask=m_row, other=0.).to(tl.float32)
    b_att = tl.where(o_c[:, None] == t, tl.sum(b_p * b_rt[None, :], axis=1)[None, :], b_att)
    b_wt = tl.load(w_ptr + row * stride_wt + i_h * stride_wh + o_k, mask=m_row, other=0.).to(tl.float32)
    b_kt = tl.load(k_ptr + row * stride_kt + i_h * stride_kh + o_k, mask=m_row, other=0.).to(tl.float32)
    b_p = tl.where((o_c == t)[:, None], b_kt[None, :], b_p * tl.exp(b_wt)[None, :])
    return b_att, b_p


@triton.jit
def diagonal_block_walk(r_ptr, k_ptr, w_ptr, start, eos, i_h, stride_rt, stride_rh, stride_kt, stride_kh,
                         stride_wt, stride_wh, K: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                         UNROLL: tl.constexpr):
    """att[t, s] of one sub-chunk's own tokens (s < t), row by row: the decayed keys
    P[s] = k_s exp(sum_{s<j<t} w_j) are one tile, multiplied by exp(w_t) as t moves on (no scans,
    BK exponentials a row). `UNROLL`: the row loop unrolled (the compiler may then hoist every row's
    loads, which costs registers: at one warp the output kernel spills 304 bytes unrolled, 52 not;
    ptxas for sm_90a, session 10) or a loop."""
    o_c = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    b_p = tl.zeros([BC, BK], dtype=tl.float32)
    b_att = tl.zeros([BC, BC], dtype=tl.float32)
    if UNROLL:
        for t in tl.static_range(BC):
            b_att, b_p = _walk_row(b_att, b_p, r_ptr, k_ptr, w_ptr, t, start, eos, i_h, stride_rt, stride_rh,
                                   stride_kt, stride_kh, stride_wt, stride_wh, o_c, o_k, m_k)
    else:
        for t in range(BC):
            b_att, b_p = _walk_row(b_att, b_p, r_ptr, k_ptr, w_ptr, t, start, eos, i_h, stride_rt, stride_rh,
                                   stride_kt, stride_kh, stride_wt, stride_wh, o_c, o_k, m_k)
    return b_att


@triton.jit
def diagonal_block_cube(r_ptr, k_ptr, w_ptr, rows, m_t, i_h, stride_rt, stride_rh, stride_kt, stride_kh,
                    stride_wt, stride_wh, K: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
                    DIAG_PRODUCTS: tl.constexpr):
    """att[t, s] of one sub-chunk's own tokens (s < t), BD key channels at a time as [t, s, BD]:
    the scan over t of the shifted w, restricted to t > s + 1, is sum_{s<j<t} w_j."""
    o_c = tl.arange(0, BC)
    m_ts = (o_c[:, None] > o_c[None, :])[:, :, None]
    m_scan = (o_c[:, None] > o_c[None, :] + 1)[:, :, None]
    b_att = tl.zeros([BC, BC], dtype=tl.float32)
    for i_d in range(0, tl.cdiv(K, BD)):
        o_d = i_d * BD + tl.arange(0, BD)
        m_td = m_t[:, None] & (o_d < K)[None, :]
        b_rd = tl.load(r_ptr + rows[:, None] * stride_rt + i_h * stride_rh + o_d[None, :], mask=m_td, other=0.)
        b_kd = tl.load(k_ptr + rows[:, None] * stride_kt + i_h * stride_kh + o_d[None, :], mask=m_td, other=0.)
        b_wpd = tl.load(w_ptr + (rows - 1)[:, None] * stride_wt + i_h * stride_wh + o_d[None, :],
                        mask=m_td & (o_c >= 1)[:, None], other=0.)
        if DIAG_PRODUCTS:  # exp(sum) as a running product of exp(w): BC x fewer exponentials
            b_ewd = tl.exp(b_wpd.to(tl.float32))
            b_e = tl.where(m_ts, tl.cumprod(tl.where(m_scan, b_ewd[:, None, :], 1.), axis=0), 0.)
        else:
            b_between = tl.cumsum(tl.where(m_scan, b_wpd.to(tl.float32)[:, None, :], 0.), axis=0)
            b_e = tl.where(m_ts, tl.exp(b_between), 0.)
        b_att += tl.sum(b_rd.to(tl.float32)[:, None, :] * b_e * b_kd.to(tl.float32)[None, :, :], axis=2)
    return b_att
