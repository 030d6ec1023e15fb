"""Each row's top-p cut as the smallest logit key it keeps, without sorting the vocabulary
(contract: `kernels.token_sample_reference.top_p_min_keys_reference`).

Why: the sampler's torch top-p sorts every row (65,536 logits), takes two softmaxes, a cumsum and a
scatter: ~0.13 ms of a batch-1 step on an H100, more than the rest of its sampling together.

The rule (tie-inclusive): with p = softmax(x / T), a row keeps every id whose logit x satisfies
mass(logits strictly above x) < top_p. The ids kept are those whose 16-bit key (the logit's bf16 or
fp16 bits, ordered as the values are) is at least the returned key. Found by a radix select over
the key's two bytes, with the mass in integer fixed point (2**40 units of exp(x / T - max)) so that
every sum is exact and its order does not matter:

- `top_p_high_fwd_kernel`, grid (B, n_chunks): each program adds its CHUNK's masses, relative to its
  chunk's maximum, into its own 256 bins of the high byte (atomics into memory no other program
  touches); the last program of the row to arrive (acq_rel counter) rescales every chunk's bins to
  the row's maximum (float64, chunk order), finds the lowest high byte whose mass above it is below
  top_p of the total, and stores it, that mass above, the total and the maximum.
- `top_p_low_fwd_kernel`, grid (B, n_chunks): the ids in that high byte add their masses into the
  row's 256 bins of the low byte; the last program finds the lowest low byte kept and stores the key.

Rows that are greedy or have top_p >= 1 are skipped (their key is left as it was). The workspace
(bins and counters) must be zeros; the kernels do not clear it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

CHUNK = 2048
FIXED_ONE = tl.constexpr(1099511627776.0)  # 2**40: a mass of exp(0) in the integer bins
ROW_STATE = 4  # float64 per row between the kernels: high byte, mass above it, top_p x total, max


@triton.jit
def ordered_key16(bits):
    """The 16-bit key (int32 in [0, 65535]) of 16-bit float bit patterns (int16), ordered as their
    values: -0 as +0, negatives below positives."""
    b = bits.to(tl.int32) & 0xFFFF
    b = tl.where(b == 0x8000, 0, b)
    return tl.where(b >= 0x8000, 0xFFFF - b, b | 0x8000)


@triton.jit
def _row_chunk(logits_ptr, stride_row, temperature_ptr, row, chunk, n_valid, CHUNK: tl.constexpr):
    """A chunk's ids, whether each is below n_valid, its scaled logit (-inf past n_valid) and key."""
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = cols < n_valid
    raw = tl.load(logits_ptr + row.to(tl.int64) * stride_row + cols, mask=valid, other=0.)
    key = ordered_key16(raw.to(tl.int16, bitcast=True))
    scaled = tl.math.div_rn(raw.to(tl.float32), tl.load(temperature_ptr + row))
    return cols, valid, tl.where(valid, scaled, float("-inf")), key


@triton.jit
def _fixed_mass(scaled, m):
    """exp(scaled - m) in 2**-40 units, truncated (0 for -inf: past n_valid)."""
    return tl.where(scaled == float("-inf"), 0., tl.exp(scaled - m) * FIXED_ONE).to(tl.int64)


@triton.jit
def _skipped(greedy_ptr, top_p_ptr, row):
    return (tl.load(greedy_ptr + row) != 0) | (tl.load(top_p_ptr + row) >= 1.0)


@triton.jit
def top_p_high_fwd_kernel(logits_ptr, stride_row, temperature_ptr, top_p_ptr, greedy_ptr, bins_ptr, chunk_max_ptr,
                          cnt_ptr, state_ptr, n_valid, n_chunks, CHUNK: tl.constexpr, CHUNKS_P2: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    if _skipped(greedy_ptr, top_p_ptr, row):
        return
    cols, valid, scaled, key = _row_chunk(logits_ptr, stride_row, temperature_ptr, row, chunk, n_valid, CHUNK)
    m_chunk = tl.max(scaled, axis=0)
    mass = _fixed_mass(scaled, m_chunk)
    tl.atomic_add(bins_ptr + (row * n_chunks + chunk) * 256 + (key >> 8), mass, mask=valid, sem="relaxed")
    tl.store(chunk_max_ptr + row * n_chunks + chunk, m_chunk)
    tl.debug_barrier()  # the bins and the maximum are written before the arrival is released
    arrived = tl.atomic_add(cnt_ptr + row, 1, sem="acq_rel", scope="gpu")
    if arrived == n_chunks - 1:
        c = tl.arange(0, CHUNKS_P2)
        mc = c < n_chunks
        m_chunks = tl.load(chunk_max_ptr + row * n_chunks + c, mask=mc, other=float("-inf"), cache_modifier=".cg")
        m = tl.max(m_chunks, axis=0)
        scale = tl.where(mc, tl.exp((m_chunks - m).to(tl.float64)), 0.)
        b = tl.arange(0, 256)
        per_chunk = tl.load(bins_ptr + (row * n_chunks + c)[:, None] * 256 + b[None, :], mask=mc[:, None], other=0,
                            cache_modifier=".cg")
        mass_bins = tl.sum(per_chunk.to(tl.float64) * scale[:, None], axis=0)  # [256]
        up_to = tl.cumsum(mass_bins, axis=0)
        total = tl.max(up_to, axis=0)  # the cumsum never decreases: its last value
        above = total - up_to  # the mass in the bins above each bin
        target = tl.load(top_p_ptr + row).to(tl.float64) * total
        high = tl.sum((above >= target).to(tl.int32), axis=0)  # the lowest bin whose mass above is < target
        tl.store(state_ptr + row * 4, high.to(tl.float64))
        tl.store(state_ptr + row * 4 + 1, tl.sum(tl.where(b == high, above, 0.), axis=0))
        tl.store(state_ptr + row * 4 + 2, target)
        tl.store(state_ptr + row * 4 + 3, m.to(tl.float64))


@triton.jit
def top_p_low_fwd_kernel(logits_ptr, stride_row, temperature_ptr, top_p_ptr, greedy_ptr, bins_ptr, cnt_ptr,
                         state_ptr, min_keys_ptr, n_valid, n_chunks, CHUNK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    if _skipped(greedy_ptr, top_p_ptr, row):
        return
    high = tl.load(state_ptr + row * 4).to(tl.int32)
    m = tl.load(state_ptr + row * 4 + 3).to(tl.float32)
    cols, valid, scaled, key = _row_chunk(logits_ptr, stride_row, temperature_ptr, row, chunk, n_valid, CHUNK)
    inside = valid & ((key >> 8) == high)
    mass = _fixed_mass(scaled, m)
    tl.atomic_add(bins_ptr + row * 256 + (key & 255), mass, mask=inside, sem="relaxed")
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + row, 1, sem="acq_rel", scope="gpu")
    if arrived == n_chunks - 1:
        b = tl.arange(0, 256)
        mass_bins = tl.load(bins_ptr + row * 256 + b, cache_modifier=".cg").to(tl.float64)
        up_to = tl.cumsum(mass_bins, axis=0)
        above = tl.load(state_ptr + row * 4 + 1) + (tl.max(up_to, axis=0) - up_to)
        low = tl.sum((above >= tl.load(state_ptr + row * 4 + 2)).to(tl.int32), axis=0)
        tl.store(min_keys_ptr + row, high * 256 + low)


def top_p_min_keys(logits: Tensor, n_valid: int, temperature: Tensor, top_p: Tensor, greedy: Tensor,
                   min_keys: Tensor, chunk: int = CHUNK) -> Tensor:
    """Writes min_keys [B] int32 of the rows that sample with top_p < 1 (others left as they are)
    and returns it. logits: [B, V] float16 or bfloat16 rows (contiguous columns); temperature, top_p
    [B] float32; greedy [B] bool. Arguments are checked by `kernels.token_sample.token_sample`."""
    B = logits.shape[0]
    n_chunks = triton.cdiv(n_valid, chunk)
    dev = logits.device
    # one zeroed buffer: both kernels' bins and counters (float64 and int64 share its 8-byte slots)
    work = torch.zeros(B * (n_chunks * 256 + 256 + 1 + ROW_STATE) + B * n_chunks, dtype=torch.int64, device=dev)
    high_bins, rest = work[:B * n_chunks * 256], work[B * n_chunks * 256:]
    low_bins, rest = rest[:B * 256], rest[B * 256:]
    state, rest = rest[:B * ROW_STATE].view(torch.float64), rest[B * ROW_STATE:]
    counters = rest[:B].view(torch.int32)  # 2B int32: the high kernel's, then the low kernel's
    chunk_max = rest[B:].view(torch.float32)[:B * n_chunks]
    grid = (B, n_chunks)
    top_p_high_fwd_kernel[grid](logits, logits.stride(0), temperature, top_p, greedy, high_bins, chunk_max, counters,
                                state, n_valid, n_chunks, CHUNK=chunk,
                                CHUNKS_P2=max(2, triton.next_power_of_2(n_chunks)), num_warps=4)
    top_p_low_fwd_kernel[grid](logits, logits.stride(0), temperature, top_p, greedy, low_bins, counters[B:], state,
                               min_keys, n_valid, n_chunks, CHUNK=chunk, num_warps=4)
    return min_keys
