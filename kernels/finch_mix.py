"""The token-shift mixes of a Finch time mix in one pass (contract: `kernels.finch_mix_reference`).

Why: PyTorch computes the LoRA's second product as a batched matmul that writes [n_mix, N, C] and a
second pass that reads it back with x and its shifted rows to write the n_mix mixed inputs: at the
1.5B shape, per layer and 2,048-token chunk, a 17.6 us product and a 38 us pass on an H100 (profile
of an engine prefill; this kernel: 30 us). Here each program owns a [BM, BC] tile of rows and
channels, loads x and the previous rows once, and for each mix does the rank-R product on the matrix
units (float32 accumulation) and stores the mixed input: one read of x, one write per mix.

`finch_mix_fwd_kernel`, grid (cdiv(N, BM), cdiv(C, BC)).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from torch import Tensor

from . import pdl

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def finch_mix_fwd_kernel(
    x_ptr, prev_ptr, h_ptr, w2_ptr, maa_ptr, out_ptr,
    N, C, stride_x, stride_prev, stride_h,
    N_MIX: tl.constexpr, R: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
    SHIFTED: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr, PRELOAD: tl.constexpr,
    BNR: tl.constexpr, BNM: tl.constexpr, ONE_ROW: tl.constexpr,
):
    i_m, i_c = tl.program_id(0), tl.program_id(1)
    rows = i_m * BM + tl.arange(0, BM)
    cols = i_c * BC + tl.arange(0, BC)
    m_r, m_c = rows < N, cols < C
    if PRELOAD:
        # every mix's LoRA rows and mix vector at once, before the wait (they depend on no earlier
        # kernel): otherwise each mix's loads wait for the previous mix's store, n_mix latencies
        o_nr, o_n = tl.arange(0, BNR), tl.arange(0, BNM)
        b_w2_all = tl.load(w2_ptr + o_nr[:, None] * C + cols[None, :], mask=(o_nr < N_MIX * R)[:, None] & m_c[None, :],
                           other=0.)
        b_maa_all = tl.load(maa_ptr + o_n[:, None] * C + cols[None, :], mask=(o_n < N_MIX)[:, None] & m_c[None, :],
                            other=0.).to(tl.float32)
    if PDL:  # (`kernels.pdl`)
        gdc_wait()
        gdc_launch_dependents()
    m_rc = m_r[:, None] & m_c[None, :]
    b_x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=m_rc, other=0.).to(tl.float32)
    if SHIFTED:  # one sequence: row t's previous row is x[t - 1], row 0's the given row
        b_prev = tl.load(x_ptr + (rows - 1)[:, None].to(tl.int64) * stride_x + cols[None, :],
                         mask=m_rc & (rows >= 1)[:, None], other=0.).to(tl.float32)
        b_first = tl.load(prev_ptr + cols, mask=m_c, other=0.).to(tl.float32)
        b_prev = tl.where((rows == 0)[:, None], b_first[None, :], b_prev)
    else:
        b_prev = tl.load(prev_ptr + rows[:, None].to(tl.int64) * stride_prev + cols[None, :], mask=m_rc,
                         other=0.).to(tl.float32)
    b_dx = b_prev - b_x
    o_r = tl.arange(0, BR)
    m_rank = o_r < R
    if PRELOAD:
        b_h_all = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + o_nr[None, :],
                          mask=m_r[:, None] & (o_nr < N_MIX * R)[None, :], other=0.)
    if ONE_ROW:
        # one row (BM == 1, PRELOAD, R == BR): every mix's rank-R product as one multiply and a sum
        # over each mix's R rows of w2, not N_MIX products padded to 16 rows on the matrix units
        # (those ran one after another: most of the kernel's time at batch 1)
        b_terms = tl.trans(b_h_all.to(tl.float32)) * b_w2_all.to(tl.float32)  # [BNR, BC]
        b_mix_all = tl.sum(tl.reshape(b_terms, [BNR // R, R, BC]), axis=1)  # [BNM, BC]: mix n in row n
        b_out_all = b_x + b_dx * (b_maa_all + b_mix_all)
        p_out = out_ptr + (o_n[:, None] * N + rows.to(tl.int64)) * C + cols[None, :]
        tl.store(p_out, b_out_all.to(out_ptr.dtype.element_ty), mask=(o_n < N_MIX)[:, None] & m_rc)
        return
    for n in tl.static_range(N_MIX):
        if PRELOAD:
            # mix n's rank columns of h against every mix's rows of w2: the other columns are exact
            # zeros, so this is mix n's product (with R a multiple of 16, as at the 1.5B shape, even
            # its float32 sums are grouped the same)
            in_mix = (o_nr >= n * R) & (o_nr < n * R + R)
            b_mix = tl.dot(tl.where(in_mix[None, :], b_h_all, tl.zeros_like(b_h_all)), b_w2_all,
                           input_precision=DOT_PRECISION)
            b_maa = tl.sum(tl.where((o_n == n)[:, None], b_maa_all, 0.), 0)
        else:
            b_h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + n * R + o_r[None, :],
                          mask=m_r[:, None] & m_rank[None, :], other=0.)
            b_w2 = tl.load(w2_ptr + (n * R + o_r)[:, None] * C + cols[None, :], mask=m_rank[:, None] & m_c[None, :],
                           other=0.)
            b_mix = tl.dot(b_h, b_w2, input_precision=DOT_PRECISION)
            b_maa = tl.load(maa_ptr + n * C + cols, mask=m_c, other=0.).to(tl.float32)
        b_out = b_x + b_dx * (b_maa[None, :] + b_mix)
        tl.store(out_ptr + (n * N + rows[:, None].to(tl.int64)) * C + cols[None, :],
                 b_out.to(out_ptr.dtype.element_ty), mask=m_rc)


def _check(x: Tensor, prev: Tensor, h: Tensor, w2: Tensor, maa: Tensor, shifted: bool) -> None:
    if x.dim() != 2 or x.dtype not in _FLOATS:
        raise ValueError(f"x: expected [N, C] in {_FLOATS}, got {list(x.shape)} {x.dtype}")
    N, C = x.shape
    if w2.dim() != 3 or w2.shape[2] != C or w2.shape[1] < 1:
        raise ValueError(f"w2: expected [n_mix, R, {C}], got {list(w2.shape)}")
    n_mix, R = w2.shape[:2]
    shapes = {"prev": (prev, (1, C) if shifted else (N, C)), "h": (h, (N, n_mix * R)), "maa": (maa, (n_mix, C))}
    for name, (t, shape) in shapes.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected {list(shape)}{' (shifted)' if name == 'prev' and shifted else ''}, "
                             f"got {list(t.shape)}")
    for name, t in (("prev", prev), ("h", h), ("w2", w2), ("maa", maa)):
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name}: expected {x.dtype} on {x.device}, got {t.dtype} on {t.device}")


# rows and channels per program, warps: the best of a sweep on an H100 (`bench_finch_mix.py`, five
# tiles): 30.4 / 224 / 952 us at 2,048 / 16,384 / 65,536 rows, against 35.6 / 271 / 1,114 at 64 x 128
TILES = (32, 128, 4)
# a decode step's few rows: narrow column blocks, so that 64 programs rather than 16 share the LoRA
# weight's read (H100, batch 1 at the 1.5B shape: 7.0 us a call at TILES, 5.3 us at these)
DECODE_ROWS, DECODE_TILES = 16, (16, 32, 2)
# up to this many rows, where the rank is a power of two >= 16, a program a row that sums each mix's
# rank-R product over its rows of w2 instead of one matrix-unit product a mix
ONE_ROW_ROWS, ONE_ROW_TILES = 4, (1, 32, 2)
# the most LoRA weight elements a decode program holds to load them all before the PDL wait (H100,
# batch 1 at the 1.5B shape, 8,192 = 256 x 32: the step 1.83-1.86 -> 1.80-1.83 ms with the WKV change)
PRELOAD_ELEMENTS = 8192


def finch_mix(x: Tensor, prev: Tensor, h: Tensor, w2: Tensor, maa: Tensor, shifted: bool,
              tiles: tuple[int, int, int] | None = None, preload: bool | None = None) -> Tensor:
    """The n_mix mixed inputs [n_mix, N, C] (contiguous, x's dtype). x: [N, C]; prev: [N, C], or
    [1, C] with `shifted` (x is one sequence; row t's previous row is x[t - 1]); h: [N, n_mix * R];
    w2: [n_mix, R, C]; maa: [n_mix, C]. See `kernels.finch_mix_reference`. `preload` (default: for
    a decode step's few rows) loads every mix's weights at once, before the PDL wait."""
    _check(x, prev, h, w2, maa, shifted)
    N, C = x.shape
    n_mix, R = w2.shape[:2]
    out = torch.empty((n_mix, N, C), dtype=x.dtype, device=x.device)
    if N == 0:
        return out
    x, prev, h = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, prev, h))
    w2, maa = w2.contiguous(), maa.contiguous()
    decode = N <= DECODE_ROWS
    BR, BNR = max(16, triton.next_power_of_2(R)), max(16, triton.next_power_of_2(n_mix * R))
    # a program a row (`ONE_ROW`): a few rows, the mixes' rows of w2 in equal power-of-two groups,
    # all of them held at once (BNR x BC elements at most PRELOAD_ELEMENTS)
    one_row_ok = R == BR and preload is not False
    if tiles is None:
        one_row_ok &= N <= ONE_ROW_ROWS and BNR * min(ONE_ROW_TILES[1], triton.next_power_of_2(C)) <= PRELOAD_ELEMENTS
        tiles = ONE_ROW_TILES if one_row_ok else DECODE_TILES if decode else TILES
    BM, BC, warps = tiles
    BC = min(BC, triton.next_power_of_2(C))
    # decode tiles hold every mix's LoRA rows at once (BNR x BC: 256 x 32 at the 1.5B shape) where
    # they fit the registers; the prefill tiles' 128 channels would not
    if preload is None:
        preload = decode and BNR * BC <= PRELOAD_ELEMENTS
    one_row = BM == 1 and one_row_ok and preload
    if BM < 16 and not one_row:
        raise ValueError(f"tiles: rows per program {BM} below 16 need a power-of-two rank >= 16 (got {R}) and "
                         "every mix's weights held at once")
    use_pdl = pdl.enabled(x.device, N)
    finch_mix_fwd_kernel[(triton.cdiv(N, BM), triton.cdiv(C, BC))](
        x, prev, h, w2, maa, out, N, C, x.stride(0), prev.stride(0), h.stride(0),
        N_MIX=n_mix, R=R, BR=BR, BM=BM, BC=BC, SHIFTED=shifted,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", PDL=use_pdl, PRELOAD=preload,
        BNR=BNR, BNM=triton.next_power_of_2(n_mix), ONE_ROW=one_row, num_warps=warps, **pdl.launch_options(use_pdl))
    return out
