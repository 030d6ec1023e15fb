"""A prompt's tail queries over its whole history, split over the keys ("flash decoding" for a few
queries): the GOLD layers' attention on a prompt's last step.

Same contract as `kernels.tail_attention_reference.tail_attention_reference`. Why: the tail is a
handful of queries (`ModelConfig.gold_tail_len` at most) against every key of the prompt. SDPA's
fused kernels give each (query block, head) pair one program that walks all keys: 32 programs at
the 1.5B shape, 61 us a layer for a 4K prompt on an H100, growing with the prompt. Here the keys
are split among NUM_SPLITS programs per head, each reading its run of keys once for all queries.

`tail_attention_fwd_kernel`, grid (H, NUM_SPLITS): program (h, s) loads the BQ (padded) queries of
head h, walks keys [s * per_split, (s + 1) * per_split) in BN-row tiles with an online softmax
(log2 domain, float32), key n visible to query i when n <= q_positions[i], and writes its partial
max m, sum l and unnormalised accumulator acc. `tail_attention_reduce_kernel`, grid (Q, H), rescales
the splits to their common max and normalises:

    out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s,     M = max_s m_s

A split that sees no key leaves m = -inf, l = 0, acc = 0 and weighs 0; a query that sees no key at
all gets zeros.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
# queries per call (one program holds them all in registers); a longer tail goes to SDPA
MAX_QUERIES = 64


@triton.jit
def tail_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, qpos_ptr, m_ptr, l_ptr, acc_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,  # [n, H, D], last dims contiguous
    n_queries, n_keys, per_split, qk_scale,  # qk_scale = scale * log2(e)
    NUM_SPLITS: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_h, i_s = tl.program_id(0), tl.program_id(1)
    o_q, o_d, o_n = tl.arange(0, BQ), tl.arange(0, BD), tl.arange(0, BN)
    m_q, m_d = o_q < n_queries, o_d < D
    q = tl.load(q_ptr + o_q[:, None] * stride_qn + i_h * stride_qh + o_d[None, :],
                mask=m_q[:, None] & m_d[None, :], other=0.0)
    q_pos = tl.load(qpos_ptr + o_q, mask=m_q, other=-1)

    m_i = tl.full([BQ], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BQ], dtype=tl.float32)
    acc = tl.zeros([BQ, BD], dtype=tl.float32)
    start = i_s * per_split
    end = tl.minimum(start + per_split, n_keys)
    for n0 in range(start, end, BN):
        keys_n = n0 + o_n
        m_n = keys_n < end
        k = tl.load(k_ptr + keys_n.to(tl.int64)[:, None] * stride_kn + i_h * stride_kh + o_d[None, :],
                    mask=m_n[:, None] & m_d[None, :], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = (keys_n[None, :] <= q_pos[:, None]) & m_n[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: no NaN from -inf - -inf
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        v = tl.load(v_ptr + keys_n.to(tl.int64)[:, None] * stride_vn + i_h * stride_vh + o_d[None, :],
                    mask=m_n[:, None] & m_d[None, :], other=0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    H = tl.num_programs(0)
    row = (i_s * BQ + o_q) * H + i_h  # workspace [NUM_SPLITS, BQ, H, (BD)]
    tl.store(m_ptr + row, m_i)
    tl.store(l_ptr + row, l_i)
    tl.store(acc_ptr + row[:, None] * BD + o_d[None, :], acc)


@triton.jit
def tail_attention_reduce_kernel(
    m_ptr, l_ptr, acc_ptr, o_ptr, stride_on, stride_oh,
    NUM_SPLITS: tl.constexpr, BQ: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
):
    i_q, i_h = tl.program_id(0), tl.program_id(1)
    H = tl.num_programs(1)
    o_s, o_d = tl.arange(0, NUM_SPLITS), tl.arange(0, BD)
    row = (o_s * BQ + i_q) * H + i_h
    m = tl.load(m_ptr + row)
    l = tl.load(l_ptr + row)
    acc = tl.load(acc_ptr + row[:, None] * BD + o_d[None, :])
    M = tl.max(m, axis=0)
    M_safe = tl.where(M == float("-inf"), 0.0, M)
    weight = tl.exp2(m - M_safe)  # -inf splits: 0
    denom = tl.sum(weight * l, axis=0)
    out = tl.sum(weight[:, None] * acc, axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(o_ptr + i_q * stride_on + i_h * stride_oh + o_d, out.to(o_ptr.dtype.element_ty), mask=o_d < D)


def default_num_splits(n_keys: int, heads: int, block: int, sms: int) -> int:
    """Two programs per multiprocessor over all heads, a power of two, at most one per key tile."""
    want = triton.next_power_of_2(max(1, -(-2 * sms // heads)))
    return max(1, min(want, triton.next_power_of_2(-(-n_keys // block))))


def _check(q: Tensor, keys: Tensor, values: Tensor, q_positions: Tensor) -> None:
    if q.dim() != 3 or keys.dim() != 3 or values.shape != keys.shape:
        raise ValueError(f"q [Q, H, D], keys and values [n, H, D] expected, got {list(q.shape)}, "
                         f"{list(keys.shape)}, {list(values.shape)}")
    if q.shape[1:] != keys.shape[1:]:
        raise ValueError(f"q: heads and head size {list(q.shape[1:])} differ from the keys' {list(keys.shape[1:])}")
    if not 0 < q.shape[0] <= MAX_QUERIES:
        raise ValueError(f"q: 1 to {MAX_QUERIES} queries, got {q.shape[0]}")
    if q.dtype not in _FLOATS or keys.dtype != q.dtype or values.dtype != q.dtype:
        raise ValueError(f"q, keys, values: one dtype of {_FLOATS}, got {q.dtype}, {keys.dtype}, {values.dtype}")
    if q_positions.shape != (q.shape[0],) or q_positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"q_positions: expected [{q.shape[0]}] int32/int64, got {list(q_positions.shape)} "
                         f"{q_positions.dtype}")
    for name, t in (("q", q), ("keys", keys), ("values", values)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: the head dimension must be contiguous")


def tail_attention(q: Tensor, keys: Tensor, values: Tensor, q_positions: Tensor, scale: float | None = None,
                   num_splits: int | None = None) -> Tensor:
    """q: [Q, H, D] (1 <= Q <= MAX_QUERIES); keys, values: [n, H, D], the sequence's positions 0..n-1;
    q_positions: [Q] int, each query's absolute position (it sees keys 0..q_positions[i]). Returns
    [Q, H, D] in q's dtype; scale defaults to 1/sqrt(D)."""
    _check(q, keys, values, q_positions)
    Q, H, D = q.shape
    n_keys = keys.shape[0]
    BQ, BN, BD = max(16, triton.next_power_of_2(Q)), 64, max(16, triton.next_power_of_2(D))
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
        num_splits = default_num_splits(n_keys, H, BN, sms)
    num_splits = triton.next_power_of_2(max(1, num_splits))
    per_split = triton.cdiv(max(1, triton.cdiv(n_keys, num_splits)), BN) * BN
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    f32 = dict(dtype=torch.float32, device=q.device)
    m = torch.empty(num_splits, BQ, H, **f32)
    l = torch.empty(num_splits, BQ, H, **f32)
    acc = torch.empty(num_splits, BQ, H, BD, **f32)
    out = torch.empty_like(q)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    tail_attention_fwd_kernel[(H, num_splits)](
        q, keys, values, q_positions, m, l, acc, q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
        values.stride(0), values.stride(1), Q, n_keys, per_split, scale * LOG2E,
        NUM_SPLITS=num_splits, BQ=BQ, BN=BN, D=D, BD=BD, DOT_PRECISION=precision, num_warps=4)
    tail_attention_reduce_kernel[(Q, H)](m, l, acc, out, out.stride(0), out.stride(1),
                                         NUM_SPLITS=num_splits, BQ=BQ, D=D, BD=BD, num_warps=1)
    return out
