"""The decode products' epilogue (`kernels.decode_gemv`, `kernels.decode_gemv_resident`): the
activation or residual applied to a product tile before its one store (contract:
`kernels.decode_gemv_reference`)."""
from __future__ import annotations

import triton
import triton.language as tl


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
