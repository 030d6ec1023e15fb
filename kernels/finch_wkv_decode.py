"""A Finch-C2 time mix's decode step from its projections to its output norm's input, in one launch
(contract: `kernels.finch_wkv_decode_reference`).

Why: between the stacked projection and the output norm the fused decode step still ran six
kernels at batch 1 (the LoRAs' tanh and second product, the decay, the key scaling, the WKV step,
the v2 add: 9.2 us a layer on an H100) for a few KB of work. Here each program derives the decay
of its head's K channels itself (the decay LoRA's second product restricted to those columns:
R_w x K multiply-adds), scales its keys, runs the WKV step on its [K, BV] state tile in place, and
adds the value2 term of its V columns.

`finch_wkv_decode_fwd_kernel`, grid (N, H, V / BV), as `kernels.wkv6_decode`.
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
def _tanh(x):
    return 1. - 2. / (tl.exp(2. * x) + 1.)


@triton.jit
def finch_wkv_decode_fwd_kernel(
    r_ptr, k_ptr, v_ptr, v2_ptr, stride_row, dh_ptr, stride_dh, vh_ptr, stride_vh,
    td_ptr, dw2_ptr, vw2_ptr, u_ptr, out_ptr, state_ptr, slots_ptr, stride_ss, stride_sh,
    A, R_W, R_V,
    K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, BR_W: tl.constexpr, BR_V: tl.constexpr,
    ONE_MINUS_W: tl.constexpr, HAS_V2: tl.constexpr, PDL: tl.constexpr,
):
    i_n, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    dtype = out_ptr.dtype.element_ty
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    row = i_n.to(tl.int64) * stride_row
    ch_k, ch_v = i_h * K + o_k, i_h * V + o_v
    # every load first (the reductions below synchronise the warps; a load after one would only
    # then start waiting for memory)
    o_rw = tl.arange(0, BR_W)
    w2 = tl.load(dw2_ptr + o_rw[:, None] * A + ch_k[None, :], mask=(o_rw < R_W)[:, None], other=0.).to(tl.float32)
    td = tl.load(td_ptr + ch_k).to(tl.float32)
    b_u = tl.load(u_ptr + ch_k).to(tl.float32)
    if HAS_V2:
        o_rv = tl.arange(0, BR_V)
        vw2 = tl.load(vw2_ptr + o_rv[:, None] * A + ch_v[None, :], mask=(o_rv < R_V)[:, None], other=0.).to(tl.float32)
    # the state tile too: a slot's state was last written by this layer's step before, and a step's
    # inputs (the slots) are copied before its first kernel, which no earlier step's kernel outlives
    slot = tl.load(slots_ptr + i_n).to(tl.int64)
    p_s = state_ptr + slot * stride_ss + i_h * stride_sh + o_k[:, None] * V + o_v[None, :]
    b_s = tl.load(p_s)
    if PDL:  # (`kernels.pdl`) what is above depends on no earlier kernel of this step: loaded before the wait
        gdc_wait()
        gdc_launch_dependents()
    hid = tl.load(dh_ptr + i_n * stride_dh + o_rw, mask=o_rw < R_W, other=0.).to(tl.float32)
    b_k = tl.load(k_ptr + row + ch_k).to(tl.float32)
    b_r = tl.load(r_ptr + row + ch_k).to(tl.float32)
    b_v = tl.load(v_ptr + row + ch_v).to(tl.float32)
    if HAS_V2:
        hid_v = tl.load(vh_ptr + i_n * stride_vh + o_rv, mask=o_rv < R_V, other=0.).to(tl.float32)
        b_v2 = tl.load(v2_ptr + row + ch_v).to(tl.float32)
    # the head's decay: its columns of the LoRA's second product
    lora = tl.sum(_tanh(hid).to(dtype).to(tl.float32)[:, None] * w2, 0).to(dtype).to(tl.float32)
    log_decay = -tl.exp((td + lora).to(dtype).to(tl.float32))
    if ONE_MINUS_W:
        b_k = (b_k * (1. - tl.exp(log_decay))).to(dtype).to(tl.float32)
    b_y = tl.sum(b_r[:, None] * b_s, axis=0) + tl.sum(b_r * b_u * b_k) * b_v
    tl.store(p_s, tl.exp(log_decay)[:, None] * b_s + b_k[:, None] * b_v[None, :])
    b_y = b_y.to(dtype).to(tl.float32)
    if HAS_V2:
        lora_v = tl.sum(_tanh(hid_v).to(dtype).to(tl.float32)[:, None] * vw2, 0).to(dtype).to(tl.float32)
        b_y = b_y + (b_v2 + lora_v).to(dtype).to(tl.float32)
    tl.store(out_ptr + i_n.to(tl.int64) * A + ch_v, b_y.to(dtype))


# value channels a program's state tile covers, and its warps
TILE_V, NUM_WARPS = 16, 2


def _rows(name: str, t: Tensor, shape: tuple[int, int], like: Tensor, stride: int | None = None) -> None:
    if tuple(t.shape) != shape or t.stride(-1) != 1 or (stride is not None and t.stride(0) != stride):
        raise ValueError(f"{name}: expected {list(shape)} with contiguous rows"
                         f"{'' if stride is None else f' of stride {stride} (as r)'}, got {list(t.shape)} {t.stride()}")
    if t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"{name}: expected {like.dtype} on {like.device}, got {t.dtype} on {t.device}")


def finch_wkv_decode(r: Tensor, k: Tensor, v: Tensor, decay_hidden: Tensor, time_decay: Tensor, decay_w2: Tensor,
                     u: Tensor, state_pool: Tensor, slots: Tensor, use_one_minus_w: bool, v2: Tensor | None = None,
                     value2_hidden: Tensor | None = None, value2_w2: Tensor | None = None) -> Tensor:
    """r, k, v, v2: [N, A] rows of one buffer (same row stride, A = H * K contiguous); decay_hidden
    [N, R_w], value2_hidden [N, R_v] (before tanh, contiguous rows); time_decay [A]; decay_w2
    [R_w, A] and value2_w2 [R_v, A] contiguous; u [H, K]; state_pool [S, H, K, V] float32 (K, V
    contiguous), updated in place at slots [N] (distinct). Returns out [N, A] in r's dtype."""
    if r.dim() != 2 or r.dtype not in _FLOATS or r.stride(1) != 1:
        raise ValueError(f"r: expected [N, A] floats with contiguous rows, got {list(r.shape)} {r.dtype}")
    N, A = r.shape
    if u.dim() != 2 or u.shape[0] * u.shape[1] != A or not u.is_contiguous():
        raise ValueError(f"u: expected a contiguous [H, K] with H * K = {A}, got {list(u.shape)}")
    H, K = u.shape
    if state_pool.dtype != torch.float32 or state_pool.dim() != 4 or state_pool.shape[1:3] != (H, K) \
            or state_pool.stride(3) != 1 or state_pool.stride(2) != state_pool.shape[3]:
        raise ValueError(f"state_pool: expected float32 [S, {H}, {K}, V] with K, V contiguous, got "
                         f"{state_pool.dtype} {list(state_pool.shape)}")
    V = state_pool.shape[3]
    if V * H != A or K & (K - 1) or V & (V - 1):
        raise ValueError(f"state_pool: heads of K = {K}, V = {V} (powers of two, H * V = A = {A})")
    if slots.shape != (N,) or slots.dtype not in (torch.int32, torch.int64) or slots.device != r.device:
        raise ValueError(f"slots: expected an integer [{N}] on {r.device}, got {slots.dtype} {list(slots.shape)}")
    for name, t in (("k", k), ("v", v)) + ((("v2", v2),) if v2 is not None else ()):
        _rows(name, t, (N, A), r, r.stride(0))
    R_w = decay_w2.shape[0]
    _rows("decay_hidden", decay_hidden, (N, R_w), r)
    _rows("decay_w2", decay_w2, (R_w, A), r, A)
    _rows("time_decay", time_decay.view(1, -1), (1, A), r)
    if (v2 is None) != (value2_hidden is None) or (v2 is None) != (value2_w2 is None):
        raise ValueError("v2, value2_hidden and value2_w2: all three or none")
    R_v = value2_w2.shape[0] if value2_w2 is not None else 1
    if v2 is not None:
        _rows("value2_hidden", value2_hidden, (N, R_v), r)
        _rows("value2_w2", value2_w2, (R_v, A), r, A)
    out = torch.empty((N, A), dtype=r.dtype, device=r.device)
    BV = min(V, TILE_V)  # narrow tiles: a small batch spreads over (N x H x V / TILE_V) programs
    use_pdl = pdl.enabled(r.device, N)
    finch_wkv_decode_fwd_kernel[(N, H, V // BV)](
        r, k, v, v2 if v2 is not None else r, r.stride(0), decay_hidden, decay_hidden.stride(0),
        value2_hidden if value2_hidden is not None else decay_hidden,
        value2_hidden.stride(0) if value2_hidden is not None else 0, time_decay, decay_w2,
        value2_w2 if value2_w2 is not None else decay_w2, u, out, state_pool, slots,
        state_pool.stride(0), state_pool.stride(1), A, R_w, R_v,
        K=K, V=V, BV=BV, BR_W=triton.next_power_of_2(R_w), BR_V=triton.next_power_of_2(R_v),
        ONE_MINUS_W=use_one_minus_w, HAS_V2=v2 is not None, PDL=use_pdl, num_warps=NUM_WARPS,
        **pdl.launch_options(use_pdl))
    return out
