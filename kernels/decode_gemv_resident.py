"""A decode step's products with each program's weight rows held in registers, loaded before the
PDL wait (contract: `kernels.decode_gemv_reference`; chosen by `kernels.decode_gemv`).

Why: at batch 1 a product is a read of its weight, and the tiled kernel (`decode_gemv`) starts
that read only once the kernel before it has finished (its PDL prefetch asks L2 for one tile). The
weights depend on no earlier kernel, so here every program loads all of its weight rows (a few rows
of the whole K, RESIDENT_ELEMENTS elements) before the wait: the read overlaps the small kernels
before the product, and every program's loads are in flight at once. Measured on an H100 (1.5B
shape, batch 1 x 4K, graph of a step, in one process): 1.656 ms with the tiled kernel, 1.516 with
this one for every product but the head (BENCHMARKS.md, session 15; the rule: `resident_applies`).
Only loads of what no earlier kernel writes go before the wait (`kernels.pdl`'s rule).

`decode_gemv_resident_fwd_kernel`, grid (cdiv(N, BN),): a program owns BN output columns (inside
one block of the plan's table, so inside one column segment) and computes the dot products of its
rows with up to BM input rows one by one in float32 (a few rows: the matrix units would idle).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from torch import Tensor

from . import pdl
from .decode_gemv_epilogue import gemv_epilogue, gemv_epilogue_inputs, gemv_rows
from .decode_gemv_reference import ACTIVATIONS

ENV_VAR = "GOLDFINCH_GEMV_RESIDENT"  # "0": every product through the tiled kernel (A/B checks)
# weights of at most RESIDENT_MAX_N rows (not the head) and RESIDENT_MAX_K columns,
# RESIDENT_ELEMENTS weight elements a program (its rows in float32: 64 registers a thread)
RESIDENT_MAX_N, RESIDENT_MAX_K, RESIDENT_ELEMENTS = 16384, 8192, 8192
# Which batches (H100, 1.5B shape, graph ms of a step, this kernel for the narrow products (N <=
# NARROW_N, K <= NARROW_K) / also the stacked ones / also the channel mix's value product, against
# the tiled kernel, one process): batch 1 x 4K 1.614-1.620 / 1.542-1.559 / 1.513-1.537 against
# 1.638-1.654; batch 4 x 4K 1.990-2.002 / 2.311 / 2.461-2.557 against 2.016-2.021 (the dot products
# one input row at a time cost more than the early read saves). So: narrow products up to
# NARROW_ROWS rows a program, every product at batch 1.
NARROW_N, NARROW_K, NARROW_ROWS = 4096, 2048, 4


@triton.jit
def decode_gemv_resident_fwd_kernel(
    x_ptr, stride_x, w_ptr, out_ptr, stride_out, groups_ptr, res_ptr, stride_res, gate_ptr, stride_gate,
    B, N, K, ACT_COLS, TABLE_BN,
    ACTIVATION: tl.constexpr, HAS_GROUPS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr,
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    cols_n = pid * BN + tl.arange(0, BN)
    m_n = cols_n < N
    o_k = tl.arange(0, KP)
    m_k = o_k < K
    # the weight rows and the block table depend on no earlier kernel: read before the wait
    w = tl.load(w_ptr + cols_n[:, None].to(tl.int64) * K + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.)
    if HAS_GROUPS:
        block = pid * BN // TABLE_BN
        g_first = tl.load(groups_ptr + 2 * block)
        g_second = tl.load(groups_ptr + 2 * block + 1)
    else:
        g_first, g_second = 0, -1
    if PDL:
        gdc_wait()  # the inputs, residual and gate are the earlier kernels'
        gdc_launch_dependents()
    row, m_row = gemv_rows(g_first, g_second, B, BM)
    m_out = m_row[:, None] & m_n[None, :]
    res, gate = gemv_epilogue_inputs(res_ptr, stride_res, gate_ptr, stride_gate, row, cols_n, m_out, BM, BN,
                                     ACTIVATION)
    w = w.to(tl.float32)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    i = tl.arange(0, BM)
    for j in tl.static_range(BM):  # slot j's row and mask, as gemv_rows makes them (B is not a constant)
        g_j = tl.where(j // B == 0, g_first, g_second)
        x = tl.load(x_ptr + (tl.maximum(g_j, 0) * B + j % B) * stride_x + o_k, mask=m_k & (j // B < 2) & (g_j >= 0),
                    other=0.)
        acc = tl.where((i == j)[:, None], tl.sum(w * x.to(tl.float32)[None, :], 1)[None, :], acc)
    gemv_epilogue(acc, out_ptr, stride_out, res, gate, row, cols_n, m_out, ACT_COLS, ACTIVATION)


def resident_applies(N: int, K: int, B: int, rows: int, device: torch.device) -> bool:
    """Whether `decode_gemv` takes this kernel for a weight [N, K], a batch of B rows and `rows` input
    rows a program (see NARROW_ROWS), unless GOLDFINCH_GEMV_RESIDENT=0. Not tied to PDL: launched
    without it (GOLDFINCH_PDL=0, cards before Hopper) the kernel computes the same, and a PDL chain
    stays comparable bit for bit with plain launches; it was measured only with PDL (H100)."""
    if os.environ.get(ENV_VAR, "1").strip() == "0" or N > RESIDENT_MAX_N or K > RESIDENT_MAX_K:
        return False
    return (N <= NARROW_N and K <= NARROW_K and rows <= NARROW_ROWS) or B == 1


def resident_gemv(x: Tensor, weight: Tensor, out: Tensor, B: int, plan, activation: str, act_cols: int,
                  residual: Tensor | None, gate: Tensor | None, rows: int) -> Tensor:
    """`decode_gemv` through this kernel (its arguments, checked there; `rows`: the input rows a
    program reads, B times the groups of a block, as `decode_gemv` found them)."""
    N, K = weight.shape
    KP = max(16, triton.next_power_of_2(K))
    BN = max(1, RESIDENT_ELEMENTS // KP)
    if plan is not None:
        BN = min(BN, plan.tuning.block_n)  # a program inside one block of the table
    use_pdl = pdl.enabled(weight.device, B)
    decode_gemv_resident_fwd_kernel[(triton.cdiv(N, BN),)](
        x, x.stride(0), weight, out, out.stride(0), plan.block_groups if plan is not None else out,
        residual if residual is not None else out, residual.stride(0) if residual is not None else 0,
        gate if gate is not None else out, gate.stride(0) if gate is not None else 0, B, N, K, act_cols,
        plan.tuning.block_n if plan is not None else BN, ACTIVATION=ACTIVATIONS.index(activation),
        HAS_GROUPS=plan is not None, BM=triton.next_power_of_2(rows), BN=BN, KP=KP, PDL=use_pdl,
        num_warps=4, **pdl.launch_options(use_pdl))
    return out
