"""A decode step's layer norm with the token-shift mixes after it, in one launch (contract:
`kernels.decode_gemv_reference.decode_norm_mix_reference`).

Why: before each of a block's products the unfused step ran a norm kernel and a mix kernel (and an
add before the time mix's output norm), 1.5-3 us each at batch 1 for a few KB of work. Here one
program per row loads the row once, takes its statistics from registers, and writes the normed row
and every mixed row. A time mix's LoRA first stage (tanh(mixed @ w1), rank 32-160) is computed
here too: its columns split over programs that each re-derive the row (2K values) and read BR rows
of w1, so that no launch waits on another for a few hundred KB of weight.

`decode_norm_mix_fwd_kernel`, grid (B, R / BR).
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
def decode_norm_mix_fwd_kernel(
    x_ptr, stride_x, add_ptr, stride_add, ln_w_ptr, ln_b_ptr, ln_out_ptr, prev_ptr, stride_prev, mix_ptr, out_ptr,
    w1t_ptr, h_ptr, B, K, R, eps,
    HAS_ADD: tl.constexpr, STORE_LN: tl.constexpr, STORE_MIX: tl.constexpr, N_MIX: tl.constexpr,  # N_MIX <= 2
    HAS_LORA: tl.constexpr, KP: tl.constexpr, BR: tl.constexpr, PDL: tl.constexpr,
):
    b, i_r = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, KP)
    m = cols < K
    first = i_r == 0  # with a LoRA, several programs share a row: the first one stores its outputs
    if HAS_LORA:
        o_r = i_r * BR + tl.arange(0, BR)
        w1t = tl.load(w1t_ptr + o_r[:, None] * K + cols[None, :], mask=(o_r < R)[:, None] & m[None, :], other=0.)
    lw = tl.load(ln_w_ptr + cols, mask=m, other=0.).to(tl.float32)
    lb = tl.load(ln_b_ptr + cols, mask=m, other=0.).to(tl.float32)
    if N_MIX > 0:
        mix0 = tl.load(mix_ptr + cols, mask=m, other=0.).to(tl.float32)
    if N_MIX > 1:
        mix1 = tl.load(mix_ptr + K + cols, mask=m, other=0.).to(tl.float32)
    if PDL:  # (`kernels.pdl`) the weights above depend on no earlier kernel: loaded before the wait
        gdc_wait()
        gdc_launch_dependents()
    # every load first: the reductions below synchronise the warps, and loads after them would
    # wait for memory only then (one program a row: its latency is the kernel's)
    x = tl.load(x_ptr + b * stride_x + cols, mask=m, other=0.)
    if HAS_ADD:
        a = tl.load(add_ptr + b * stride_add + cols, mask=m, other=0.)
    if N_MIX > 0:
        prev = tl.load(prev_ptr + b * stride_prev + cols, mask=m, other=0.).to(tl.float32)
    if HAS_ADD:  # the sum rounded as a PyTorch add stores it
        x = (x.to(tl.float32) + a.to(tl.float32)).to(x_ptr.dtype.element_ty)
    x = x.to(tl.float32)
    mean = tl.sum(x, 0) / K
    d = tl.where(m, x - mean, 0.)
    rstd = 1. / tl.sqrt(tl.sum(d * d, 0) / K + eps)
    base = (d * rstd * lw + lb).to(x_ptr.dtype.element_ty)
    if STORE_LN:
        tl.store(ln_out_ptr + b * K + cols, base, mask=m & first)
    if N_MIX > 0:
        base32 = base.to(tl.float32)
        dx = prev - base32
        mixed0 = (base32 + dx * mix0).to(x_ptr.dtype.element_ty)
        if STORE_MIX:
            tl.store(out_ptr + b * K + cols, mixed0, mask=m & first)
    if N_MIX > 1:
        tl.store(out_ptr + (B + b) * K + cols, (base32 + dx * mix1).to(out_ptr.dtype.element_ty), mask=m & first)
    if HAS_LORA:  # h = tanh(mixed row 0 @ w1): this program's BR columns, the product rounded first
        p = tl.sum(w1t.to(tl.float32) * mixed0.to(tl.float32)[None, :], 1).to(x_ptr.dtype.element_ty)
        h = 1. - 2. / (tl.exp(2. * p.to(tl.float32)) + 1.)
        tl.store(h_ptr + b * R + o_r, h.to(h_ptr.dtype.element_ty), mask=o_r < R)


def _check(name: str, t: Tensor, shape: tuple[int, ...], like: Tensor, contiguous: bool = False) -> None:
    if tuple(t.shape) != shape or t.stride(-1) != 1 or (contiguous and not t.is_contiguous()):
        raise ValueError(f"{name}: expected {list(shape)}{' contiguous' if contiguous else ' with contiguous rows'}, "
                         f"got {list(t.shape)} strides {t.stride()}")
    if t.device != like.device or (t.dtype != like.dtype and name not in ("ln weight", "ln bias")):
        raise ValueError(f"{name}: expected {like.dtype} on {like.device}, got {t.dtype} on {t.device}")


def decode_norm_mix(x: Tensor, ln: tuple[Tensor, Tensor, float], ln_out: Tensor | None = None,
                    prev: Tensor | None = None, mix: Tensor | None = None, out: Tensor | None = None,
                    addend: Tensor | None = None, lora_w1t: Tensor | None = None,
                    lora_out: Tensor | None = None) -> None:
    """x: [B, K] (rows may be strided); ln: (weight [K], bias [K], eps); ln_out: [B, K] contiguous,
    receives the normed rows; prev [B, K], mix [G, K] contiguous and out [G*B, K] contiguous: the
    mixed rows (out may be None when a LoRA reads them); addend: [B, K], added to x before the norm;
    lora_w1t [R, K] contiguous and lora_out [B, R] contiguous: tanh(mixed row of mix 0 @ lora_w1t.T)."""
    if x.dim() != 2 or x.dtype not in _FLOATS or x.stride(1) != 1:
        raise ValueError(f"x: expected [B, K] floats with contiguous rows, got {list(x.shape)} {x.dtype}")
    B, K = x.shape
    _check("ln weight", ln[0], (K,), x)
    _check("ln bias", ln[1], (K,), x)
    if (prev is None) != (mix is None) or (mix is None and out is not None):
        raise ValueError("prev, mix and out: prev and mix together, out only with them")
    if (lora_w1t is None) != (lora_out is None) or (lora_w1t is not None and mix is None):
        raise ValueError("lora_w1t and lora_out: both or neither, and only with prev and mix")
    if mix is not None and out is None and lora_w1t is None:
        raise ValueError("out: the mixed rows need out or a LoRA to go to")
    if ln_out is None and mix is None:
        raise ValueError("ln_out or mix: nothing to write")
    if ln_out is not None:
        _check("ln_out", ln_out, (B, K), x, contiguous=True)
    if addend is not None:
        _check("addend", addend, (B, K), x)
    G = R = 0
    if mix is not None:
        G = mix.shape[0]
        if not 1 <= G <= 2:
            raise ValueError(f"mix: one or two mix vectors (a decode step's norms have), got {G}")
        _check("prev", prev, (B, K), x)
        _check("mix", mix, (G, K), x, contiguous=True)
        if out is not None:
            _check("out", out, (G * B, K), x, contiguous=True)
    if lora_w1t is not None:
        R = lora_w1t.shape[0]
        _check("lora_w1t", lora_w1t, (R, K), x, contiguous=True)
        _check("lora_out", lora_out, (B, R), x, contiguous=True)
    KP = triton.next_power_of_2(K)
    # a LoRA's columns split over programs (each re-derives the row): BR rows of w1 in registers
    BR = max(1, min(triton.next_power_of_2(R), 16384 // KP)) if R else 1
    grid = (B, triton.cdiv(R, BR) if R else 1)
    use_pdl = pdl.enabled(x.device, B)
    decode_norm_mix_fwd_kernel[grid](
        x, x.stride(0), addend if addend is not None else x, addend.stride(0) if addend is not None else 0,
        ln[0], ln[1], ln_out if ln_out is not None else x, prev if prev is not None else x,
        prev.stride(0) if prev is not None else 0, mix if mix is not None else x, out if out is not None else x,
        lora_w1t if lora_w1t is not None else x, lora_out if lora_out is not None else x, B, K, R, float(ln[2]),
        HAS_ADD=addend is not None, STORE_LN=ln_out is not None, STORE_MIX=out is not None, N_MIX=G,
        HAS_LORA=lora_w1t is not None, KP=KP, BR=BR, PDL=use_pdl, num_warps=4 if KP * BR <= 8192 else 8,
        **pdl.launch_options(use_pdl))
