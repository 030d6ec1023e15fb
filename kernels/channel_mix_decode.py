"""A block's channel mix with its residual for a decode step's few rows, in two kernels.

Same contract as `kernels.channel_mix_decode_reference.channel_mix_decode_reference`. At a handful
of rows the channel mix is bound by reading its weights (two thirds of a block's bytes), but
through cuBLAS and fused elementwise kernels it is six kernels per block (mixes, the stacked
key/receptance product, relu^2, the value product and its split-K reduction, the gated residual),
each paying its launch and ramp. Here:

- `channel_mix_key_receptance_fwd_kernel`, grid (cdiv(F + C, BLOCK_N),): each program owns
  BLOCK_N rows of the stacked weight [F + C, C] (all key rows or all receptance rows: F is a
  multiple of BLOCK_N), builds its input mix (xk or xr) tile by tile from xf, prev and the mix
  vector while it streams its weight rows, and applies relu^2 (key) or sigmoid (receptance) to
  its outputs: one [M, F + C] activation buffer;
- `channel_mix_value_fwd_kernel`, grid (cdiv(C, BLOCK_N),): the value product over that buffer's
  key part, and the gated residual x + sigmoid(r) * (...) on its outputs.

Both run M <= 16 rows as one 16-row tile (rows past M masked); the products accumulate in
float32 (IEEE for float32 inputs). Nothing reads a tensor back to the host: capturable in a CUDA
graph. Each kernel reads its weight once: (F + C) * C and C * F elements per call.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_ROWS = 16
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def channel_mix_key_receptance_fwd_kernel(
    xf_ptr, prev_ptr, maa_k_ptr, maa_r_ptr, w_ptr, act_ptr,
    M, C, F, stride_xf, stride_prev, stride_w, stride_act,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    i_n = tl.program_id(0)
    o_m = tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = o_m < M
    m_n = o_n < F + C
    is_key = i_n * BLOCK_N < F  # the whole block: F is a multiple of BLOCK_N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, C, BLOCK_K, num_stages=NUM_STAGES):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < C
        m_x = m_m[:, None] & m_k[None, :]
        b_xf = tl.load(xf_ptr + o_m[:, None] * stride_xf + o_k[None, :], mask=m_x, other=0.).to(tl.float32)
        b_prev = tl.load(prev_ptr + o_m[:, None] * stride_prev + o_k[None, :], mask=m_x, other=0.).to(tl.float32)
        b_maa = tl.where(is_key, tl.load(maa_k_ptr + o_k, mask=m_k, other=0.),
                         tl.load(maa_r_ptr + o_k, mask=m_k, other=0.)).to(tl.float32)
        b_w = tl.load(w_ptr + o_n[:, None].to(tl.int64) * stride_w + o_k[None, :],
                      mask=m_n[:, None] & m_k[None, :], other=0.)
        b_x = (b_xf + (b_prev - b_xf) * b_maa[None, :]).to(b_w.dtype)
        acc += tl.dot(b_x, tl.trans(b_w), input_precision=PRECISION)
    relu = tl.maximum(acc, 0.)
    out = tl.where(is_key, relu * relu, tl.sigmoid(acc))
    tl.store(act_ptr + o_m[:, None] * stride_act + o_n[None, :], out.to(act_ptr.dtype.element_ty),
             mask=m_m[:, None] & m_n[None, :])


@triton.jit
def channel_mix_value_fwd_kernel(
    act_ptr, w_ptr, x_ptr, out_ptr,
    M, C, F, stride_act, stride_w, stride_x, stride_out,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    i_n = tl.program_id(0)
    o_m = tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = o_m < M
    m_n = o_n < C
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, F, BLOCK_K, num_stages=NUM_STAGES):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < F
        b_a = tl.load(act_ptr + o_m[:, None] * stride_act + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.)
        b_w = tl.load(w_ptr + o_n[:, None].to(tl.int64) * stride_w + o_k[None, :],
                      mask=m_n[:, None] & m_k[None, :], other=0.)
        acc += tl.dot(b_a.to(b_w.dtype), tl.trans(b_w), input_precision=PRECISION)
    m_o = m_m[:, None] & m_n[None, :]
    # the receptance gates sit after the key part of each activation row
    b_r = tl.load(act_ptr + o_m[:, None] * stride_act + F + o_n[None, :], mask=m_o, other=0.).to(tl.float32)
    b_x = tl.load(x_ptr + o_m[:, None] * stride_x + o_n[None, :], mask=m_o, other=0.).to(tl.float32)
    tl.store(out_ptr + o_m[:, None] * stride_out + o_n[None, :], (b_x + b_r * acc).to(out_ptr.dtype.element_ty),
             mask=m_o)


def _block_n(F: int, preferred: int) -> int:
    for b in (preferred, 64, 32, 16):
        if b <= preferred and F % b == 0:
            return b
    raise ValueError(f"channel mix: the ffn width F = {F} must be a multiple of 16")


def channel_mix_decode_fwd(x: Tensor, xf: Tensor, prev: Tensor, maa_k: Tensor, maa_r: Tensor,
                           kr_weight: Tensor, value_weight: Tensor, block_n_kr: int = 64,
                           block_n_value: int = 16, block_k: int = 128, num_stages: int = 4) -> Tensor:
    """The launcher: inputs already checked."""
    M, C = x.shape
    F = value_weight.shape[1]
    precision = "ieee" if kr_weight.dtype == torch.float32 else "tf32"
    act = torch.empty((M, F + C), dtype=x.dtype, device=x.device)
    out = torch.empty_like(x)
    bn = _block_n(F, block_n_kr)
    channel_mix_key_receptance_fwd_kernel[(triton.cdiv(F + C, bn),)](
        xf, prev, maa_k, maa_r, kr_weight, act, M, C, F,
        xf.stride(0), prev.stride(0), kr_weight.stride(0), act.stride(0),
        BLOCK_M=MAX_ROWS, BLOCK_N=bn, BLOCK_K=block_k, PRECISION=precision, NUM_STAGES=num_stages)
    channel_mix_value_fwd_kernel[(triton.cdiv(C, block_n_value),)](
        act, value_weight, x, out, M, C, F,
        act.stride(0), value_weight.stride(0), x.stride(0), out.stride(0),
        BLOCK_M=MAX_ROWS, BLOCK_N=block_n_value, BLOCK_K=block_k, PRECISION=precision, NUM_STAGES=num_stages)
    return out


def channel_mix_decode(x: Tensor, xf: Tensor, prev: Tensor, maa_k: Tensor, maa_r: Tensor,
                       kr_weight: Tensor, value_weight: Tensor, **launch) -> Tensor:
    """x + sigmoid(xr @ W_r^T) * (relu(xk @ W_k^T)^2 @ W_v^T) for M <= 16 rows.

    x, xf, prev: [M, C]; maa_k, maa_r: [C]; kr_weight: [F + C, C] (ffn key rows, then receptance
    rows; F a multiple of 16); value_weight: [C, F]. One floating dtype for the weights and rows
    (the mix vectors may differ), last dims contiguous, one device. Returns [M, C] in x's dtype.
    `launch`: block sizes and pipeline stages of `channel_mix_decode_fwd` (benchmarks)."""
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"x must be [M, C] with 1 <= M <= {MAX_ROWS}, got {tuple(x.shape)}")
    M, C = x.shape
    for name, t in (("xf", xf), ("prev", prev)):
        if t.shape != (M, C):
            raise ValueError(f"{name} must be [{M}, {C}] like x, got {tuple(t.shape)}")
    for name, t in (("maa_k", maa_k), ("maa_r", maa_r)):
        if t.shape != (C,):
            raise ValueError(f"{name} must be [{C}], got {tuple(t.shape)}")
    if value_weight.dim() != 2 or value_weight.shape[0] != C:
        raise ValueError(f"value_weight must be [{C}, F], got {tuple(value_weight.shape)}")
    F = value_weight.shape[1]
    if kr_weight.shape != (F + C, C):
        raise ValueError(f"kr_weight must be [F + C, C] = [{F + C}, {C}], got {tuple(kr_weight.shape)}")
    if F % 16:
        raise ValueError(f"the ffn width F = {F} must be a multiple of 16")
    tensors = {"x": x, "xf": xf, "prev": prev, "maa_k": maa_k, "maa_r": maa_r, "kr_weight": kr_weight,
               "value_weight": value_weight}
    for name, t in tensors.items():
        if t.dtype not in _FLOATS:
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim")
    dtypes = {t.dtype for n, t in tensors.items() if n not in ("maa_k", "maa_r")}
    if len(dtypes) != 1:
        raise ValueError(f"x, xf, prev and the weights must share one dtype, got {sorted(map(str, dtypes))}")
    if len({t.device for t in tensors.values()}) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted({str(t.device) for t in tensors.values()})}")
    return channel_mix_decode_fwd(x, xf, prev, maa_k, maa_r, kr_weight, value_weight, **launch)
