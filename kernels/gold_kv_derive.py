"""One GOLD layer's keys and values of packed rows, derived and stored to the working-set pages in
one kernel launch (programs for keys and for values).

Same contract and arithmetic as `kernels.gold_kv_derive_reference` (see its docstring). Why a
kernel: a prompt's last step derives every GOLD layer's keys and values over its whole history (the
tail queries attend to all of it, and the working set keeps them for decoding). As PyTorch ops that
is a dozen passes over [N, C] and a scattered copy per layer (H100, 4,096 rows: 297 us of GPU time
a layer compiled, 190 us here: `benchmarks/bench_tail_kernels.py`); here each kind is four passes
over a block of rows that stays in L2.

`gold_kv_derive_fwd_kernel`, grid (cdiv(N, BM), 2): a program owns BM rows of one kind and walks the
C channels in BC-wide tiles four times, keeping only per-row vectors in registers:
  1. h = tanh(mix_input @ maa_w1[:, half])           [BM, r]  (the mix input is recomputed per tile)
  2. x1 = base + (prev - base) * (maa + h @ maa_w2[half]), stored to `out`; g += x1 @ lora_w1
  3. g = tanh(g); x2 = x1 + g @ lora_w2, stored to `out`; row sums and sums of squares
  4. layer norm of x2 with the affine weights, stored to `out` and to the pages at the row's slot
Products take the activation dtype's inputs with float32 accumulation and are rounded to that dtype
where the PyTorch path rounds its product outputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gold_kv_derive_reference import GoldKVDeriveWeights

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _tanh(x):
    # 1 - 2 / (e^2x + 1): exact limits at both ends in float32 (e^2x overflows to inf: 1)
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def gold_kv_derive_fwd_kernel(
    proto_ptr, prev_proto_ptr, tv_ptr, prev_tv_ptr,  # [N, C] each: the rows' inputs, their predecessors'
    maa_v_cache_ptr, maa_w1_ptr, maa_w2_ptr,  # [C]; [C, 2r]; [2, r, C]
    maa_k_ptr, maa_v_ptr,  # [C] each
    key_w1_ptr, key_w2_ptr, value_w1_ptr, value_w2_ptr,  # [C, R]; [R, C]; [C, R]; [R, C]
    ln_k_w_ptr, ln_k_b_ptr, ln_v_w_ptr, ln_v_b_ptr,  # [C] each
    slots_ptr, keys_ptr, values_ptr, key_pages_ptr, value_pages_ptr,  # [N] int64 (-1: not stored); [L, N, C] x2; [L, S, C] x2
    N, eps, page_layer_stride,  # the pages' layer stride (elements; each layer's [S, C] contiguous)
    C: tl.constexpr, R_MIX: tl.constexpr, R: tl.constexpr, R_MIX_PAD: tl.constexpr, R_PAD: tl.constexpr,
    BM: tl.constexpr, BC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_m, kind, layer = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # kind 0: keys, 1: values
    # the layer's weights (each stacked [L, ...] contiguous), outputs and pages
    layer64 = layer.to(tl.int64)
    maa_v_cache_ptr += layer64 * C
    maa_w1_ptr += layer64 * (C * 2 * R_MIX)
    maa_w2_ptr += layer64 * (2 * R_MIX * C)
    maa_k_ptr += layer64 * C
    maa_v_ptr += layer64 * C
    key_w1_ptr += layer64 * (C * R)
    key_w2_ptr += layer64 * (R * C)
    value_w1_ptr += layer64 * (C * R)
    value_w2_ptr += layer64 * (R * C)
    ln_k_w_ptr += layer64 * C
    ln_k_b_ptr += layer64 * C
    ln_v_w_ptr += layer64 * C
    ln_v_b_ptr += layer64 * C
    keys_ptr += layer64 * N * C
    values_ptr += layer64 * N * C
    key_pages_ptr += layer64 * page_layer_stride
    value_pages_ptr += layer64 * page_layer_stride
    # one branch picks the kind's tensors: both kinds share a launch (twice the programs)
    if kind == 0:
        base_ptr, prev_ptr, maa_ptr = proto_ptr, prev_proto_ptr, maa_k_ptr
        lora_w1_ptr, lora_w2_ptr, ln_w_ptr, ln_b_ptr = key_w1_ptr, key_w2_ptr, ln_k_w_ptr, ln_k_b_ptr
        out_ptr, pages_ptr = keys_ptr, key_pages_ptr
    else:
        base_ptr, prev_ptr, maa_ptr = tv_ptr, prev_tv_ptr, maa_v_ptr
        lora_w1_ptr, lora_w2_ptr, ln_w_ptr, ln_b_ptr = value_w1_ptr, value_w2_ptr, ln_v_w_ptr, ln_v_b_ptr
        out_ptr, pages_ptr = values_ptr, value_pages_ptr
    mix_ptr, mix_prev_ptr = tv_ptr, prev_tv_ptr
    stride_w1 = 2 * R_MIX
    maa_w1_ptr += kind * R_MIX  # the kind's half of the columns
    maa_w2_ptr += kind * R_MIX * C
    rows = i_m * BM + tl.arange(0, BM)
    m_rows = rows < N
    row_offs = rows.to(tl.int64)[:, None] * C
    # LoRA ranks padded to powers of two >= 16 (tl.dot): padded weight rows/columns load as zeros
    o_c, o_r, o_R = tl.arange(0, BC), tl.arange(0, R_MIX_PAD), tl.arange(0, R_PAD)
    m_r, m_R = o_r < R_MIX, o_R < R
    dtype = keys_ptr.dtype.element_ty

    # 1. the mix LoRA's hidden layer
    acc_h = tl.zeros([BM, R_MIX_PAD], dtype=tl.float32)
    for c0 in range(0, C, BC):
        cols = c0 + o_c
        xo = tl.load(mix_ptr + row_offs + cols[None, :], mask=m_rows[:, None], other=0.0).to(tl.float32)
        xo_prev = tl.load(mix_prev_ptr + row_offs + cols[None, :], mask=m_rows[:, None], other=0.0).to(tl.float32)
        xxx = xo + (xo_prev - xo) * tl.load(maa_v_cache_ptr + cols).to(tl.float32)[None, :]
        w1 = tl.load(maa_w1_ptr + cols[:, None] * stride_w1 + o_r[None, :], mask=m_r[None, :], other=0.0)
        acc_h += tl.dot(xxx.to(w1.dtype), w1, input_precision=DOT_PRECISION)
    h = _tanh(acc_h.to(dtype).to(tl.float32)).to(dtype)

    # 2. the mixed input x1, and the key/value LoRA's hidden layer
    acc_g = tl.zeros([BM, R_PAD], dtype=tl.float32)
    for c0 in range(0, C, BC):
        cols = c0 + o_c
        offs = row_offs + cols[None, :]
        w2 = tl.load(maa_w2_ptr + o_r[:, None] * C + cols[None, :], mask=m_r[:, None], other=0.0)
        mixed = tl.dot(h, w2, input_precision=DOT_PRECISION)
        base = tl.load(base_ptr + offs, mask=m_rows[:, None], other=0.0).to(tl.float32)
        prev = tl.load(prev_ptr + offs, mask=m_rows[:, None], other=0.0).to(tl.float32)
        maa = tl.load(maa_ptr + cols).to(tl.float32)[None, :]
        x1 = (base + (prev - base) * (maa + mixed.to(dtype).to(tl.float32))).to(dtype)
        tl.store(out_ptr + offs, x1, mask=m_rows[:, None])
        lora_w1 = tl.load(lora_w1_ptr + cols[:, None] * R + o_R[None, :], mask=m_R[None, :], other=0.0)
        acc_g += tl.dot(x1, lora_w1, input_precision=DOT_PRECISION)
    g = _tanh(acc_g.to(dtype).to(tl.float32)).to(dtype)

    # 3. x2 = x1 + the LoRA's output; the row statistics of x2
    row_sum = tl.zeros([BM], dtype=tl.float32)
    row_sq = tl.zeros([BM], dtype=tl.float32)
    for c0 in range(0, C, BC):
        cols = c0 + o_c
        offs = row_offs + cols[None, :]
        x1 = tl.load(out_ptr + offs, mask=m_rows[:, None], other=0.0).to(tl.float32)
        lora_w2 = tl.load(lora_w2_ptr + o_R[:, None] * C + cols[None, :], mask=m_R[:, None], other=0.0)
        lora = tl.dot(g, lora_w2, input_precision=DOT_PRECISION)
        x2 = (x1 + lora.to(dtype).to(tl.float32)).to(dtype)
        tl.store(out_ptr + offs, x2, mask=m_rows[:, None])
        x2 = x2.to(tl.float32)
        row_sum += tl.sum(x2, axis=1)
        row_sq += tl.sum(x2 * x2, axis=1)
    mean = row_sum / C
    rstd = 1.0 / tl.sqrt(tl.maximum(row_sq / C - mean * mean, 0.0) + eps)

    # 4. layer norm, to `out` and to the row's page slot
    slots = tl.load(slots_ptr + rows, mask=m_rows, other=-1)
    stored = (slots >= 0)[:, None]
    slot_offs = tl.maximum(slots, 0).to(tl.int64)[:, None] * C
    for c0 in range(0, C, BC):
        cols = c0 + o_c
        offs = row_offs + cols[None, :]
        x2 = tl.load(out_ptr + offs, mask=m_rows[:, None], other=0.0).to(tl.float32)
        y = (x2 - mean[:, None]) * rstd[:, None] * tl.load(ln_w_ptr + cols).to(tl.float32)[None, :] \
            + tl.load(ln_b_ptr + cols).to(tl.float32)[None, :]
        tl.store(out_ptr + offs, y.to(dtype), mask=m_rows[:, None])
        tl.store(pages_ptr + slot_offs + cols[None, :], y.to(key_pages_ptr.dtype.element_ty),
                 mask=m_rows[:, None] & stored)


def _padded(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def _launch(proto: Tensor, prev_proto: Tensor, tv: Tensor, prev_tv: Tensor, w: GoldKVDeriveWeights,
            slots: Tensor, keys: Tensor, values: Tensor, key_pages: Tensor, value_pages: Tensor, eps: float) -> None:
    """Stacked form: weights [L, ...], keys/values [L, N, C], pages [L, S, C]."""
    N, C = proto.shape
    n_layers = w.maa_w1.shape[0]
    r, R = w.maa_w2.shape[2], w.key_w1.shape[2]
    # a stacked launch's programs are rows x layers: tiled as that many rows (H100, 8 layers of 2,048
    # rows: 520 us at the long-row tiles, 786 at the short-row ones)
    BM, BC, warps = _tiles(N * n_layers, C)
    precision = "ieee" if proto.dtype == torch.float32 else "tf32"
    gold_kv_derive_fwd_kernel[(triton.cdiv(N, BM), 2, n_layers)](
        proto, prev_proto, tv, prev_tv, *(t.contiguous() for t in w), slots, keys, values, key_pages, value_pages,
        N, eps, key_pages.stride(0), C=C, R_MIX=r, R=R, R_MIX_PAD=_padded(r), R_PAD=_padded(R), BM=BM, BC=BC,
        DOT_PRECISION=precision, num_warps=warps)


# A program re-reads the layer's LoRA weights (1.3 MB per kind at C = 2048) for its BM rows: many
# rows amortise that, few fill more multiprocessors. Chosen from sweeps on an H100 (BM 16/32/64 x
# BC 64/128 x 4/8 warps, bf16, C = 2048, both kinds per launch): 2,048 rows best at BM 16 / BC 128
# (113 us a layer); 4,096 rows 190-195 us at BM 64 (the compiled PyTorch ops and the scattered copy
# to the pages: 334 us); 16,384 rows 610 us at BM 64 / BC 64 (BM 16: 806 us); 65,536 rows 2.35 ms
# (PyTorch compiled: 4.09 ms)
LONG_ROWS = 4096


def _tiles(N: int, C: int) -> tuple[int, int, int]:
    """(BM, BC, warps): rows per program, channels per tile (dividing C), warps per program."""
    BM, widest, warps = (64, 64, 4) if N >= LONG_ROWS else (16, 128, 4)
    return BM, next(bc for bc in (128, 64, 32, 16) if bc <= widest and C % bc == 0), warps


def _check(proto_keys: Tensor, tensors: dict[str, Tensor], w: GoldKVDeriveWeights, row_slots: Tensor,
           key_pages: Tensor, value_pages: Tensor) -> None:
    """Stacked form (weights [L, ...], pages [L, S, C])."""
    N, C = proto_keys.shape
    for name, t in tensors.items():
        if t.shape != (N, C) or t.dtype != proto_keys.dtype or t.device != proto_keys.device:
            raise ValueError(f"{name}: expected [{N}, {C}] {proto_keys.dtype} on {proto_keys.device}, "
                             f"got {list(t.shape)} {t.dtype} on {t.device}")
    if proto_keys.dtype not in _FLOATS:
        raise ValueError(f"proto_keys: dtype {proto_keys.dtype} not in {_FLOATS}")
    n_layers, r2, R = w.maa_w1.shape[0], w.maa_w1.shape[-1], w.key_w1.shape[-1]
    for name, t, shape in (("maa_w1", w.maa_w1, (C, r2)), ("maa_w2", w.maa_w2, (2, r2 // 2, C)),
                           ("key_w1", w.key_w1, (C, R)), ("value_w1", w.value_w1, (C, R)),
                           ("key_w2", w.key_w2, (R, C)), ("value_w2", w.value_w2, (R, C))) + tuple(
            (name, getattr(w, name), (C,)) for name in ("maa_v_cache", "maa_k", "maa_v", "ln_k_weight", "ln_k_bias",
                                                      "ln_v_weight", "ln_v_bias")):
        if tuple(t.shape) != (n_layers, *shape) or t.dtype != proto_keys.dtype:
            raise ValueError(f"weights.{name}: expected {list(shape)} (or [L, ...] stacked) {proto_keys.dtype}, "
                             f"got {list(t.shape)} {t.dtype}")
    if C % 16:
        raise ValueError(f"proto_keys: the channel count must be a multiple of 16, got {C}")
    if r2 % 2 or r2 == 0 or R == 0:
        raise ValueError(f"weights: LoRA ranks must be positive (maa_w1 with an even width), got {r2} and {R}")
    if row_slots.shape != (N,) or row_slots.dtype != torch.int64:
        raise ValueError(f"row_slots: expected [{N}] int64, got {list(row_slots.shape)} {row_slots.dtype}")
    for name, p in (("key_pages", key_pages), ("value_pages", value_pages)):
        if (p.dim() != 3 or p.shape[0] != n_layers or p.shape[2] != C or not p[0].is_contiguous()
                or p.stride() != key_pages.stride() or p.dtype != key_pages.dtype):
            raise ValueError(f"{name}: expected [S, {C}] (or [{n_layers}, S, {C}]) {key_pages.dtype}, each layer "
                             f"contiguous, as key_pages; got {list(p.shape)} {p.dtype} strides {p.stride()}")


def gold_kv_derive(proto_keys: Tensor, prev_proto_keys: Tensor, token_values: Tensor, prev_token_values: Tensor,
                   w: GoldKVDeriveWeights, row_slots: Tensor, key_pages: Tensor, value_pages: Tensor,
                   eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Keys and values [N, C] (contiguous, the activation dtype) of N packed rows; row i's are also
    stored at flat page row `row_slots[i]` of `key_pages` / `value_pages` ([S, C], one layer's pages
    flattened), unless that slot is -1.

    proto_keys, prev_proto_keys, token_values, prev_token_values: [N, C], each row's inputs and its
    predecessor's (zeros before a history's start). `w`: see `GoldKVDeriveWeights`.

    Several layers in one launch: every weight stacked [L, ...] (contiguous), pages [L, S, C] (each
    layer's [S, C] contiguous, e.g. a view of the working-set pool); returns keys and values
    [L, N, C]. (A prompt's last step derives all GOLD layers from the same inputs: at 4,096 rows one
    layer is 128 programs, less than a wave of an H100.)"""
    tensors = {"proto_keys": proto_keys, "prev_proto_keys": prev_proto_keys, "token_values": token_values,
               "prev_token_values": prev_token_values}
    stacked = w.maa_w1.dim() == 3
    if not stacked:
        w = GoldKVDeriveWeights(*(t[None] for t in w))
        key_pages, value_pages = key_pages[None], value_pages[None]
    _check(proto_keys, tensors, w, row_slots, key_pages, value_pages)
    proto_keys, prev_proto_keys, token_values, prev_token_values = (t.contiguous() for t in tensors.values())
    n_layers, (N, C) = w.maa_w1.shape[0], proto_keys.shape
    keys = torch.empty((n_layers, N, C), dtype=proto_keys.dtype, device=proto_keys.device)
    values = torch.empty_like(keys)
    if N:
        _launch(proto_keys, prev_proto_keys, token_values, prev_token_values, w, row_slots.contiguous(), keys, values,
                key_pages, value_pages, eps)
    return (keys, values) if stacked else (keys[0], values[0])
