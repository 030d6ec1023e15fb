"""Paged decode attention, split over the keys ("flash decoding"): one query token per sequence.

Same contract as `kernels.paged_attention_reference.paged_decode_attention_reference`. Keys and
values live in pages of a shared pool, [num_blocks, page_size, H, D]; sequence b's position p is
at block `block_tables[b, p // page_size]`, offset `p % page_size`.

Two kernels. `paged_decode_attention_fwd_kernel`, grid (B, H, num_splits): each program takes a
contiguous run of the sequence's pages, cdiv(cdiv(seq_len, page), num_splits) of them, the split
computed in the kernel from `seq_lens`, and walks it one page (one [page_size, D] tile of keys and
of values) at a time with an online softmax, writing its partial max m, sum l and unnormalised
accumulator acc (float32, log2 domain). `paged_decode_attention_reduce_kernel`, grid (B, H),
rescales the splits to a common max and normalises:

    out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s,     M = max_s m_s

A split with no pages (short sequence, many splits) leaves m = -inf, l = 0, acc = 0 and weighs 0;
a sequence of length 0 gives zeros. With num_splits == 1 the first kernel normalises and writes the
output itself, and the reduce is skipped.

The grid and the float32 workspace depend only on (B, H, num_splits, D), never on the contents of
`seq_lens` or `block_tables`: no host sync, so a call can be captured in a CUDA graph and replayed
with new lengths and tables. Each program reads its (b, h) slice of K and V once: the kernel moves
2 * sum(seq_lens) * H * D * itemsize bytes plus the small workspace.
"""
from __future__ import annotations

import math

import torch

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from torch import Tensor

from . import pdl

LOG2E = 1.4426950408889634
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_INTS = (torch.int32, torch.int64)


@triton.jit
def paged_decode_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, sl_ptr, m_ptr, l_ptr, acc_ptr, o_ptr,
    stride_qb, stride_qh,  # q [B, H, D]
    stride_kn, stride_kp, stride_kh,  # k_pages [num_blocks, page, H, D]: block, slot, head strides
    stride_vn, stride_vp, stride_vh,  # v_pages likewise (every last dim is contiguous)
    stride_btb,  # block_tables [B, max_pages], last dim contiguous
    stride_ob, stride_oh,  # out [B, H, D] (used only when NUM_SPLITS == 1)
    max_pages, qk_scale,  # qk_scale = scale * log2(e)
    NUM_SPLITS: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    NUM_STAGES: tl.constexpr, PDL: tl.constexpr, PREFETCH_PAGES: tl.constexpr,
):
    i_b, i_h, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b64 = i_b.to(tl.int64)
    o_p = tl.arange(0, PAGE)
    o_d = tl.arange(0, BD)
    m_d = o_d < D

    # lengths and tables are the step's inputs, copied before its first kernel: read before the wait
    seq_len = tl.maximum(tl.load(sl_ptr + i_b).to(tl.int32), 0)
    n_pages = tl.minimum(tl.cdiv(seq_len, PAGE), max_pages)  # never past the table
    per_split = tl.cdiv(n_pages, NUM_SPLITS)
    first = i_s * per_split
    last = tl.minimum(first + per_split, n_pages)  # first >= last: an empty split
    p_bt = bt_ptr + i_b64 * stride_btb
    if PDL:  # (`kernels.pdl`)
        # ask L2 for the split's first pages while the kernel before runs (the new token's row of
        # them is written earlier in this step: only prefetched, read after the wait)
        for j in tl.static_range(PREFETCH_PAGES):
            ok = first + j < last
            block = tl.load(p_bt + first + j, mask=ok, other=0).to(tl.int64)  # block 0: a harmless line
            pdl.prefetch_l2(k_ptr + block * stride_kn + o_p * stride_kp + i_h * stride_kh)
            pdl.prefetch_l2(v_ptr + block * stride_vn + o_p * stride_vp + i_h * stride_vh)
        gdc_wait()
        gdc_launch_dependents()

    b_q = tl.load(q_ptr + i_b64 * stride_qb + i_h * stride_qh + o_d, mask=m_d, other=0.).to(tl.float32)
    b_q = b_q * qk_scale
    b_m = tl.full([], float("-inf"), tl.float32)
    b_l = tl.full([], 0., tl.float32)
    b_acc = tl.zeros([BD], dtype=tl.float32)
    for i_p in tl.range(first, last, num_stages=NUM_STAGES):  # stages > 1: pages prefetched
        block = tl.load(p_bt + i_p).to(tl.int64)  # int64: pools are many GB
        m_t = (i_p * PAGE + o_p) < seq_len  # slots of the last page past the end are never read
        m_kv = m_t[:, None] & m_d[None, :]
        b_k = tl.load(k_ptr + block * stride_kn + o_p[:, None] * stride_kp + i_h * stride_kh + o_d[None, :],
                      mask=m_kv, other=0.).to(tl.float32)
        b_v = tl.load(v_ptr + block * stride_vn + o_p[:, None] * stride_vp + i_h * stride_vh + o_d[None, :],
                      mask=m_kv, other=0.).to(tl.float32)
        b_s = tl.where(m_t, tl.sum(b_k * b_q[None, :], axis=1), float("-inf"))  # [PAGE], log2 domain
        # the page's first slot is always inside the sequence, so m_new is finite
        m_new = tl.maximum(b_m, tl.max(b_s, axis=0))
        alpha = tl.exp2(b_m - m_new)
        b_p = tl.exp2(b_s - m_new)
        b_l = b_l * alpha + tl.sum(b_p, axis=0)
        b_acc = b_acc * alpha + tl.sum(b_p[:, None] * b_v, axis=0)
        b_m = m_new

    if NUM_SPLITS == 1:
        b_o = b_acc / tl.where(b_l > 0, b_l, 1.)  # seq_len 0: acc is 0, the output zeros
        tl.store(o_ptr + i_b64 * stride_ob + i_h * stride_oh + o_d, b_o.to(o_ptr.dtype.element_ty), mask=m_d)
    else:
        i_w = (i_b64 * tl.num_programs(1) + i_h) * NUM_SPLITS + i_s  # workspace [B, H, NUM_SPLITS(, D)]
        tl.store(m_ptr + i_w, b_m)
        tl.store(l_ptr + i_w, b_l)
        tl.store(acc_ptr + i_w * D + o_d, b_acc, mask=m_d)


@triton.jit
def paged_decode_attention_reduce_kernel(
    m_ptr, l_ptr, acc_ptr, o_ptr,
    stride_ob, stride_oh,
    NUM_SPLITS: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # (`kernels.pdl`)
        gdc_wait()
        gdc_launch_dependents()
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    i_b64 = i_b.to(tl.int64)
    o_s = tl.arange(0, BS)
    o_d = tl.arange(0, BD)
    m_s, m_d = o_s < NUM_SPLITS, o_d < D
    i_w = (i_b64 * tl.num_programs(1) + i_h) * NUM_SPLITS

    b_m = tl.load(m_ptr + i_w + o_s, mask=m_s, other=float("-inf"))
    b_l = tl.load(l_ptr + i_w + o_s, mask=m_s, other=0.)
    b_acc = tl.load(acc_ptr + (i_w + o_s)[:, None] * D + o_d[None, :], mask=m_s[:, None] & m_d[None, :], other=0.)
    m_max = tl.max(b_m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0., m_max)  # every split empty (seq_len 0): no -inf - -inf
    w = tl.exp2(b_m - m_max)  # empty splits: 2^-inf = 0
    den = tl.sum(w * b_l, axis=0)
    num = tl.sum(w[:, None] * b_acc, axis=0)
    b_o = num / tl.where(den > 0, den, 1.)
    tl.store(o_ptr + i_b64 * stride_ob + i_h * stride_oh + o_d, b_o.to(o_ptr.dtype.element_ty), mask=m_d)


def _num_warps(page: int, BD: int, num_splits: int) -> int:
    # many splits (a batch of one or two): short runs of pages, where 2 warps a program did best
    # (H100, batch 1 x 4K, 8 layers' K/V in turn as in a step, us a layer at 16 splits and 3
    # stages: 2 warps 17.0, 4 warps 19.5; scratch probe, results/attention_b1_h100_s12.txt)
    if num_splits >= 8:
        return 2
    return 4 if page * BD >= 2048 else 2


# pages in flight per program (software-pipelined loop). H200, H=32 D=64 pages of 64, bf16
# (benchmarks/bench_paged_attention.py sweep): 3 stages cut b64 x 4K from 680 to 598 us and b1 x 128K
# (32 splits) from 416 to 302 us
DEFAULT_STAGES = 3
# pages of K and V a program asks L2 for before its PDL wait (batch 1 at 4K: 2 pages a program)
PREFETCH_PAGES = 2


def paged_decode_attention_fwd(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_tables: Tensor,
                               seq_lens: Tensor, num_splits: int, scale: float, num_stages: int | None = None) -> Tensor:
    """The launcher: inputs already checked; every last dim contiguous, seq_lens contiguous.
    Allocates the output and, for num_splits > 1, a float32 workspace of B * H * num_splits * (D + 2)."""
    B, H, D = q.shape
    page = k_pages.shape[1]
    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    if B == 0 or H == 0:
        return out
    BD = triton.next_power_of_2(D)
    num_warps = _num_warps(page, BD, num_splits)
    if num_splits == 1:
        m = l = acc = out  # unused by the kernel
    else:
        m = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty((B, H, num_splits, D), dtype=torch.float32, device=q.device)
    qs, ks, vs, os_ = q.stride(), k_pages.stride(), v_pages.stride(), out.stride()
    use_pdl = pdl.enabled(q.device, B)
    paged_decode_attention_fwd_kernel[(B, H, num_splits)](
        q, k_pages, v_pages, block_tables, seq_lens, m, l, acc, out,
        qs[0], qs[1], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], block_tables.stride(0), os_[0], os_[1],
        block_tables.shape[1], scale * LOG2E,
        NUM_SPLITS=num_splits, PAGE=page, D=D, BD=BD, NUM_STAGES=num_stages or DEFAULT_STAGES, PDL=use_pdl,
        PREFETCH_PAGES=PREFETCH_PAGES, num_warps=num_warps, **pdl.launch_options(use_pdl),
    )
    if num_splits > 1:
        BS = triton.next_power_of_2(num_splits)
        paged_decode_attention_reduce_kernel[(B, H)](
            m, l, acc, out, os_[0], os_[1],
            NUM_SPLITS=num_splits, BS=BS, D=D, BD=BD, PDL=use_pdl, num_warps=4 if BS * BD >= 2048 else 2,
            **pdl.launch_options(use_pdl),
        )
    return out


def paged_decode_attention(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_tables: Tensor, seq_lens: Tensor,
                           num_splits: int, scale: float | None = None) -> Tensor:
    """Decode attention of B single-token queries over paged keys and values.

    q: [B, H, D] (float16, bfloat16 or float32).
    k_pages, v_pages: [num_blocks, page_size, H, D], one float dtype (usually q's), last dim
        contiguous; the other dims may have any stride (views such as
        `pool[layer].view(num_blocks, page_size, H, D)`); page_size a power of two.
    block_tables: [B, max_pages] int32 (or int64): sequence b's pages in order; entries past its last
        page are arbitrary and never read.
    seq_lens: [B] int32 (or int64), each in [0, max_pages * page_size] (a longer one is cut at the
        table: nothing past the table is read).
    num_splits: >= 1, programs per (sequence, head); splits left without pages are fine.
    scale: defaults to 1/sqrt(D).

    Returns out [B, H, D] in q's dtype: out[b, h] = softmax(q[b, h] . K_b[:, h]^T * scale) @ V_b[:, h]
    over the first seq_lens[b] positions, accumulated in float32; zeros where seq_lens[b] == 0.
    Checks shapes, dtypes and devices only, never contents: no host sync, capturable in a CUDA graph."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, D], got {tuple(q.shape)}")
    B, H, D = q.shape
    if q.dtype not in _FLOATS:
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    if k_pages.dim() != 4 or k_pages.shape[2:] != (H, D):
        raise ValueError(f"k_pages must be [num_blocks, page_size, H, D] = [num_blocks, page_size, {H}, {D}], "
                         f"got {tuple(k_pages.shape)}")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages must have k_pages' shape {tuple(k_pages.shape)}, got {tuple(v_pages.shape)}")
    if k_pages.dtype not in _FLOATS:
        raise ValueError(f"k_pages must be float16, bfloat16 or float32, got {k_pages.dtype}")
    if v_pages.dtype != k_pages.dtype:
        raise ValueError(f"v_pages must be in k_pages' dtype {k_pages.dtype}, got {v_pages.dtype}")
    for name, t in (("k_pages", k_pages), ("v_pages", v_pages)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (D) dim, got strides {t.stride()}")
    page = k_pages.shape[1]
    if page < 1 or page & (page - 1):
        raise ValueError(f"k_pages' page_size must be a power of two, got {page}")
    if block_tables.dim() != 2 or block_tables.shape[0] != B or block_tables.dtype not in _INTS:
        raise ValueError(f"block_tables must be int32 [B, max_pages] = [{B}, max_pages], "
                         f"got {block_tables.dtype} {tuple(block_tables.shape)}")
    if seq_lens.shape != (B,) or seq_lens.dtype not in _INTS:
        raise ValueError(f"seq_lens must be int32 [B] = [{B}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be an int >= 1, got {num_splits!r}")
    device = q.device
    if not (k_pages.device == v_pages.device == block_tables.device == seq_lens.device == device):
        tensors = (q, k_pages, v_pages, block_tables, seq_lens)
        raise ValueError(f"all tensors must be on one device; got {[str(t.device) for t in tensors]}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    if not seq_lens.is_contiguous():
        seq_lens = seq_lens.contiguous()
    return paged_decode_attention_fwd(q, k_pages, v_pages, block_tables, seq_lens, num_splits, scale)
