"""A decode step's skinny products with their activation or residual fused in (contract:
`kernels.decode_gemv_reference`).

Why: at batch 1 a Finch layer ran 25 kernels for 92 us of GPU time on an H100, of which 48 us were
its four large products and 44 us twenty small kernels (norms, mixes, activations, a split-K
reduction, each 1-6 us however little it does). Here a stacked weight's column segments read
different input groups (r, k, v and the LoRAs' first stages in one launch), the activation or
residual is applied to the accumulator before the store, and no split-K reduction is needed.
(Computing the layer norm and mixes inside the product was tried: every program repeating them
between its weight loads made the channel-mix product 36 us instead of 21 for the unfused kernels;
`kernels.decode_norm_mix` does them once.)

At batch 1 (and for the narrow weights up to 4 rows) `decode_gemv` launches
`kernels.decode_gemv_resident` instead, whose programs read all their weight rows before the PDL
wait (`resident_applies` says where; GOLDFINCH_GEMV_RESIDENT=0 keeps this kernel everywhere).

`decode_gemv_fwd_kernel`, grid (cdiv(N, BN),): a program owns BN weight rows (output columns) and
streams them over K against its input rows padded to BM (the matrix units then cost nothing next
to the weight read). A program's columns lie in one segment; a block table (built once per weight,
`plan_columns`) says which input groups read it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from torch import Tensor

from . import pdl
from .decode_gemv_epilogue import gemv_epilogue, gemv_epilogue_inputs, gemv_rows
from .decode_gemv_reference import ACTIVATIONS, ColumnSegments
from .decode_gemv_resident import resident_applies, resident_gemv

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def decode_gemv_fwd_kernel(
    x_ptr, stride_x, w_ptr, out_ptr, stride_out, groups_ptr, res_ptr, stride_res, gate_ptr, stride_gate,
    ws_ptr, cnt_ptr, B, N, K, ACT_COLS, PREFETCH_K, K_SPLIT, WS_STRIDE,
    ACTIVATION: tl.constexpr, HAS_GROUPS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr, LINE: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)  # which of the SPLIT_K runs of K_SPLIT weight columns
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    cols_n = pid * BN + tl.arange(0, BN)
    m_n = cols_n < N
    if HAS_GROUPS:  # the block table is made once per weight: read before the wait
        g_first = tl.load(groups_ptr + 2 * pid)
        g_second = tl.load(groups_ptr + 2 * pid + 1)
    else:
        g_first, g_second = 0, -1
    row, m_row = gemv_rows(g_first, g_second, B, BM)  # the input row and the output row of each slot
    m_out = m_row[:, None] & m_n[None, :]
    if PDL:
        # the weight depends on no earlier kernel: ask L2 for this program's first PREFETCH_K
        # weight columns (one request per LINE elements) while the kernel before it finishes
        lines = tl.arange(0, BK // LINE) * LINE
        base = w_ptr + tl.minimum(cols_n, N - 1).to(tl.int64)[:, None] * K
        for k0 in range(k_lo, tl.minimum(k_lo + PREFETCH_K, k_hi), BK):
            pdl.prefetch_l2(base + tl.minimum(k0 + lines, K - 1)[None, :])
        gdc_wait()  # the inputs, residual and output are the earlier kernels'
        gdc_launch_dependents()
    # the epilogue's residual and gate, asked for before the weights stream rather than after
    # (their latency would otherwise follow the last product tile)
    res, gate = gemv_epilogue_inputs(res_ptr, stride_res, gate_ptr, stride_gate, row, cols_n, m_out, BM, BN,
                                     ACTIVATION)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        cols_k = k0 + tl.arange(0, BK)
        m_k = cols_k < k_hi
        inp = tl.load(x_ptr + row[:, None] * stride_x + cols_k[None, :], mask=m_row[:, None] & m_k[None, :], other=0.)
        w = tl.load(w_ptr + cols_n[:, None].to(tl.int64) * K + cols_k[None, :], mask=m_n[:, None] & m_k[None, :],
                    other=0.)
        acc = tl.dot(inp, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if SPLIT_K > 1:
        # split-K: each run stores its float32 partial; the run that arrives last at this column
        # block's counter adds them in run order (the same sum whatever the arrival order), applies
        # the epilogue, stores, and sets the counter back to 0 for the next call
        p_ws = ws_ptr + row[:, None] * N + cols_n[None, :]
        tl.store(p_ws + pid_k * WS_STRIDE, acc, mask=m_out)
        tl.debug_barrier()  # every thread's partial is stored before the arrival is released
        arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            acc = tl.zeros([BM, BN], dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                acc += tl.load(p_ws + s * WS_STRIDE, mask=m_out, other=0., cache_modifier=".cg")
            gemv_epilogue(acc, out_ptr, stride_out, res, gate, row, cols_n, m_out, ACT_COLS, ACTIVATION)
            tl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed", scope="gpu")
    else:
        gemv_epilogue(acc, out_ptr, stride_out, res, gate, row, cols_n, m_out, ACT_COLS, ACTIVATION)


@dataclass(frozen=True)
class GemvTuning:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4
    # weight tiles (block_k columns each) a program asks L2 for before its inputs are ready (with
    # PDL: `kernels.pdl`). H100, batch 1 at the 1.5B shape, decode step 1.87-1.91 ms without PDL:
    # 0 tiles 1.85-1.87, 1 tile 1.82-1.85, 2 tiles 1.85, 4 tiles 1.92-1.93, all 2.12
    prefetch_tiles: int = 1
    # runs of K in separate programs, added by the last to finish (with `split_counters`, launches
    # of at most SPLIT_K_ROWS rows): more programs in flight for a narrow weight over a long K
    split_k: int = 1


# programs that fit one wave of an H100 at the wide tiles' shared memory (one program a multiprocessor)
ONE_WAVE = 132
# launches of at most this many rows split K where the tuning says so (measured at batch 1)
SPLIT_K_ROWS = 4


def default_tuning(N: int, K: int, split: bool = True) -> GemvTuning:
    """Best of a sweep on an H100 at M = 1-16 (scratch probe, bf16, 4 warps, 4 stages): wide weights
    64 x 256 (6,144 x 2,048: 11.0 us, cuBLAS 11.7; the 65,536-row head: 89.5 us, cuBLAS 96.5) unless
    that is between one and two waves, then 32 x 128 (9,216 x 2,048: 15.5 us, cuBLAS 15.5); narrow
    ones 16 x 512 (2,048 x 7,168: 13.2 us, cuBLAS 14.9 + 1.7 for its split-K reduction)."""
    fit = lambda bk: min(bk, max(16, triton.next_power_of_2(K)))  # noqa: E731
    if N >= 4096:
        waves = triton.cdiv(N, 64) / ONE_WAVE
        return GemvTuning(32, fit(128)) if 1 < waves <= 2 else GemvTuning(64, fit(256))
    if K >= 4096 and split:
        # the channel mix's value weight (2,048 x 7,168) at batch 1: 14.50 us in one run of K, 13.39
        # in four of 32 x 128 tiles (probe, H100, results/gemv_variants_h100_s11.txt)
        return GemvTuning(32, fit(128), split_k=4)
    return GemvTuning(16, fit(512))


@dataclass(frozen=True)
class ColumnPlan:
    """A weight's column segments with the block table for one tuning (built once per weight)."""

    segments: ColumnSegments
    tuning: GemvTuning
    block_groups: Tensor  # [n_blocks, 2] int32: the groups reading each block's columns (-1: none)


def plan_columns(segments: ColumnSegments, K: int, device, tuning: GemvTuning | None = None) -> ColumnPlan:
    """The block table of `segments` over a weight [segments.ends[-1], K]; the block width is the
    tuning's, halved until every segment boundary falls on a block boundary (at least 16)."""
    N = segments.ends[-1]
    tuning = tuning or default_tuning(N, K, split=False)  # a plan's products never split K
    bn = tuning.block_n
    while bn > 16 and any(e % bn for e in segments.ends[:-1]):
        bn //= 2
    if any(e % bn for e in segments.ends[:-1]):
        raise ValueError(f"segments: boundaries {segments.ends[:-1]} are not multiples of 16")
    table = []
    for start, end, groups in segments.spans():
        pair = (groups[0], groups[1] if len(groups) > 1 else -1)
        table += [pair] * (triton.cdiv(end, bn) - start // bn)
    return ColumnPlan(segments, dataclasses.replace(tuning, block_n=bn),
                      torch.tensor(table, dtype=torch.int32, device=device))


def _check_rows(name: str, t: Tensor, shape: tuple[int, int], dtype, device) -> None:
    if t.dim() != 2 or tuple(t.shape) != shape or t.stride(1) != 1:
        raise ValueError(f"{name}: expected {list(shape)} with contiguous rows, got {list(t.shape)} "
                         f"strides {t.stride()}")
    if t.dtype != dtype or t.device != device:
        raise ValueError(f"{name}: expected {dtype} on {device}, got {t.dtype} on {t.device}")


def _check_inputs(x, weight, out, B: int, G: int, plan, activation: str, residual, gate) -> int:
    """Raises ValueError naming the bad argument; returns the input groups a column block reads."""
    N, K = weight.shape
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: {activation!r} not in {ACTIVATIONS}")
    if weight.dim() != 2 or not weight.is_contiguous() or weight.dtype not in _FLOATS:
        raise ValueError(f"weight: expected a contiguous [N, K] float matrix, got {list(weight.shape)} {weight.dtype}")
    if plan is not None and plan.segments.ends[-1] != N:
        raise ValueError(f"plan: segments end at {plan.segments.ends[-1]}, weight has {N} rows")
    per_block = 2 if plan is not None and any(len(g) > 1 for g in plan.segments.groups) else 1
    if not 1 <= B or per_block * B > 64:
        raise ValueError(f"batch: {per_block} groups of {B} rows per block, at most 64 rows")
    dt, dev = weight.dtype, weight.device
    _check_rows("x", x, (G * B, K), dt, dev)
    _check_rows("out", out, (G * B, N), dt, dev)
    for name, t in (("residual", residual), ("gate", gate)):
        needed = activation in ("residual", "gated_residual") if name == "residual" else activation == "gated_residual"
        if needed != (t is not None):
            raise ValueError(f"{name}: {'required' if needed else 'not used'} with activation {activation!r}")
        if t is not None:
            _check_rows(name, t, (G * B, N), dt, dev)
    return per_block


def _split_k(plan: ColumnPlan | None, N: int, K: int, rows: int,
             split_counters: Tensor | None) -> tuple[GemvTuning, int]:
    """The tuning to launch and its runs of K: the tuning's split where there are counters and at
    most SPLIT_K_ROWS rows; otherwise one run (a plan's tuning keeps the blocks its table is for,
    the default tuning falls back to its unsplit tiles)."""
    tuning = plan.tuning if plan is not None else default_tuning(N, K)
    if tuning.split_k == 1 or (split_counters is not None and rows <= SPLIT_K_ROWS):
        return tuning, tuning.split_k
    if plan is None:
        return default_tuning(N, K, split=False), 1
    return dataclasses.replace(tuning, split_k=1), 1


def decode_gemv(x: Tensor, weight: Tensor, out: Tensor, batch: int, plan: ColumnPlan | None = None,
                activation: str = "none", act_cols: int = 0, residual: Tensor | None = None,
                gate: Tensor | None = None, split_counters: Tensor | None = None) -> Tensor:
    """Writes and returns out [G*B, N] (rows may be strided, channels contiguous).

    x: [G*B, K] input rows (strided rows allowed); weight: [N, K] contiguous; plan: the column
    segments (`plan_columns`), None for one group reading every column; activation: one of
    ACTIVATIONS (`act_cols` for relu_square; residual and gate [G*B, N] for the residual ones);
    split_counters: int32 zeros, one per column block at least (`new_split_counters`), which every call
    leaves zero: lets a tuning with split_k > 1 split K (launches of at most SPLIT_K_ROWS rows)."""
    B, (N, K) = batch, weight.shape
    G = plan.segments.n_groups if plan is not None else 1
    per_block = _check_inputs(x, weight, out, B, G, plan, activation, residual, gate)
    dt, dev = weight.dtype, weight.device
    if resident_applies(N, K, B, B * per_block, dev):
        return resident_gemv(x, weight, out, B, plan, activation, act_cols, residual, gate, rows=B * per_block)
    tuning, S = _split_k(plan, N, K, G * B, split_counters)
    n_blocks = triton.cdiv(N, tuning.block_n)
    bk, line = tuning.block_k, 128 // weight.element_size()  # a 128-byte line of L2
    k_split = triton.cdiv(triton.cdiv(K, S), bk) * bk
    workspace = out
    if S > 1:
        c = split_counters
        if c.dtype != torch.int32 or c.device != dev or c.dim() != 1 or c.numel() < n_blocks:
            raise ValueError(f"split_counters: expected int32 [>= {n_blocks}] on {dev}, got {c.dtype} "
                             f"{list(c.shape)} on {c.device}")
        workspace = torch.empty((S, G * B, N), dtype=torch.float32, device=dev)
    use_pdl = pdl.enabled(dev, B)
    decode_gemv_fwd_kernel[(n_blocks, S)](
        x, x.stride(0), weight, out, out.stride(0), plan.block_groups if plan is not None else out,
        residual if residual is not None else out, residual.stride(0) if residual is not None else 0,
        gate if gate is not None else out, gate.stride(0) if gate is not None else 0,
        workspace, split_counters if S > 1 else out, B, N, K, act_cols,
        min(K, tuning.prefetch_tiles * bk), k_split, G * B * N, ACTIVATION=ACTIVATIONS.index(activation),
        HAS_GROUPS=plan is not None, BM=max(16, triton.next_power_of_2(B * per_block)), BN=tuning.block_n, BK=bk,
        DOT_PRECISION="ieee" if dt == torch.float32 else "tf32", PDL=use_pdl, LINE=min(line, bk), SPLIT_K=S,
        num_warps=tuning.num_warps, num_stages=tuning.num_stages, **pdl.launch_options(use_pdl))
    return out


def new_split_counters(device, size: int = 1 << 12) -> Tensor:
    """Arrival counters for split-K products (`decode_gemv`'s split_counters): zeros that every call
    leaves zero, so one buffer serves every product launched one after another on a stream."""
    return torch.zeros(size, dtype=torch.int32, device=device)
