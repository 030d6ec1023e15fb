"""What the decode products' two kernels (`kernels.decode_gemv`, `kernels.decode_gemv_resident`)
share: the rows a program reads and writes, and the epilogue, the activation or residual applied to
a product tile before its one store (contract: `kernels.decode_gemv_reference`)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gemv_rows(g_first, g_second, B, BM: tl.constexpr):
    """A program's BM row slots: slot i reads input group (g_first, g_second)[i // B] (-1: none),
    batch row i % B. Returns (row [BM], the input and output row; m_row [BM], whether it is read)."""
    i = tl.arange(0, BM)
    which, src = i // B, i % B
    group = tl.where(which == 0, g_first, g_second)
    m_row = (which < 2) & (group >= 0)
    return tl.where(m_row, group, 0) * B + src, m_row


@triton.jit
def gemv_epilogue_inputs(res_ptr, stride_res, gate_ptr, stride_gate, row, cols_n, m_out, BM: tl.constexpr,
                         BN: tl.constexpr, ACTIVATION: tl.constexpr):
    """The residual and gate tiles [BM, BN] in float32 that ACTIVATION reads (zeros where it does not)."""
    res = tl.zeros([BM, BN], dtype=tl.float32)
    gate = tl.zeros([BM, BN], dtype=tl.float32)
    if ACTIVATION >= 3:
        res = tl.load(res_ptr + row[:, None] * stride_res + cols_n[None, :], mask=m_out, other=0.).to(tl.float32)
    if ACTIVATION == 4:
        gate = tl.load(gate_ptr + row[:, None] * stride_gate + cols_n[None, :], mask=m_out, other=0.).to(tl.float32)
    return res, gate


@triton.jit
def gemv_epilogue(acc, out_ptr, stride_out, res, gate, row, cols_n, m_out, ACT_COLS, ACTIVATION: tl.constexpr):
    """Stores epilogue(acc) [BM, BN] at out[row, cols_n]; ACTIVATION indexes
    `decode_gemv_reference.ACTIVATIONS` (res, gate: the residual and gate tiles, float32)."""
    p = acc.to(out_ptr.dtype.element_ty).to(tl.float32)  # the product as the unfused op stores it
    if ACTIVATION == 1:
        p = 1. - 2. / (tl.exp(2. * p) + 1.)  # tanh
    elif ACTIVATION == 2:
        p = tl.where((cols_n < ACT_COLS)[None, :], tl.maximum(p, 0.) * tl.maximum(p, 0.), p)
    elif ACTIVATION == 3:
        p += res
    elif ACTIVATION == 4:
        p = res + p / (1. + tl.exp(-gate))
    tl.store(out_ptr + row[:, None] * stride_out + cols_n[None, :], p.to(out_ptr.dtype.element_ty), mask=m_out)
