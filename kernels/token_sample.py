"""Seeded sampling of a step's logits in one launch (contract: `kernels.token_sample_reference`).

Why: the sampler's torch path for a plain sampled batch (temperature only, OpenAI's defaults) is
~20 launches after the decode step: the float32 copy, log_softmax, softmax, the int64 noise hash
(compiled or ~40 passes), the division, argmax, gather (H100, 1.5B shape, batch 1 at 4K: 0.087 ms
of GPU time a step, the step itself 1.62 ms). Here one kernel draws every row's token and its raw
log-prob.

`token_sample_fwd_kernel`, grid (B, n_chunks): a program reads one CHUNK of a row. A greedy row
scores each id by its logit; a sampled row by log(p / E) up to a constant: x / temperature -
log(E), E the row's Exp(1) noise of that id (`engine.sampling_noise`'s hash in 32-bit unsigned
arithmetic, its -log(u) in float64 as the reference takes it). The program stores its best score,
the first id of it, and the raw logits' maximum and sum of exp; the last program of a row to arrive
at the row's counter (acq_rel) combines the chunks in chunk order (the same result whatever the
order of arrival), stores the token and its raw log-prob, and sets the counter back to 0.

The draw is the reference's but for rounding: the reference compares p / E in float32 after a
softmax, this compares x / T - log(E); two ids whose scores agree to ~1e-6 may be ordered either way.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .top_p_threshold import ordered_key16, top_p_min_keys

CHUNK = 2048  # logits a program reads (32 programs a row at a 65,536 vocabulary)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_FMIX_C1 = tl.constexpr(0x85EBCA6B)  # `engine.sampling_noise`'s murmur3 fmix32 multipliers and salts
_FMIX_C2 = tl.constexpr(0xC2B2AE35)
_SALT_LO = tl.constexpr(0x9E3779B9)
_SALT_HI = tl.constexpr(0x7F4A7C15)
_TWO_POW_M32 = tl.constexpr(2.3283064365386963e-10)  # 2**-32, exact


@triton.jit
def _fmix32(x):
    """murmur3's 32-bit finaliser on uint32 (wrapping products)."""
    x = x ^ (x >> 16)
    x = x * tl.full([], _FMIX_C1, tl.uint32)
    x = x ^ (x >> 13)
    x = x * tl.full([], _FMIX_C2, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _exponential_noise(seed, step, cols):
    """Exp(1) noise (float32) of ids `cols` for a row's int64 seed and step: `counter_hash_bits`'s
    two row keys and per-id hash, then -log((h + 0.5) / 2**32) in float64."""
    s_lo = seed.to(tl.uint32)  # the low 32 bits
    s_hi = (seed >> 32).to(tl.uint32)  # the raw high bits
    t = step.to(tl.uint32)
    k1 = _fmix32(_fmix32(_fmix32(s_lo ^ tl.full([], _SALT_LO, tl.uint32)) ^ s_hi) ^ t)
    k2 = _fmix32(_fmix32(_fmix32(s_hi ^ tl.full([], _SALT_HI, tl.uint32)) ^ s_lo) ^ t)
    h = _fmix32(_fmix32(cols.to(tl.uint32) + k1) ^ k2)
    u = (h.to(tl.float64) + 0.5) * _TWO_POW_M32
    return (-tl.log(u)).to(tl.float32)


@triton.jit
def token_sample_fwd_kernel(logits_ptr, stride_row, temperature_ptr, greedy_ptr, seeds_ptr, steps_ptr,
                            top_p_ptr, min_keys_ptr, part_ptr, part_idx_ptr, cnt_ptr, ids_ptr, logprobs_ptr, n_valid,
                            n_chunks, CHUNK: tl.constexpr, CHUNKS_P2: tl.constexpr, HAS_TOP_P: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    raw = tl.load(logits_ptr + row.to(tl.int64) * stride_row + cols, mask=cols < n_valid, other=float("-inf"))
    x = raw.to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # a NaN is chosen, as torch.argmax chooses it
    m_raw = tl.max(x, axis=0)
    s_raw = tl.sum(tl.where(x == float("-inf"), 0., tl.exp(x - m_raw)), axis=0)
    score = x
    if tl.load(greedy_ptr + row) == 0:
        noise = _exponential_noise(tl.load(seeds_ptr + row), tl.load(steps_ptr + row), cols)
        score = tl.math.div_rn(x, tl.load(temperature_ptr + row)) - tl.log(noise)
        if HAS_TOP_P:
            if tl.load(top_p_ptr + row) < 1.0:  # only ids at or above the row's cut take part
                kept = ordered_key16(raw.to(tl.int16, bitcast=True)) >= tl.load(min_keys_ptr + row)
                score = tl.where(kept, score, float("-inf"))
    best = tl.max(score, axis=0)
    first = tl.min(tl.where(score == best, cols, n_valid), axis=0)
    base = (row * n_chunks + chunk) * 3
    tl.store(part_ptr + base, best)
    tl.store(part_ptr + base + 1, m_raw)
    tl.store(part_ptr + base + 2, s_raw)
    tl.store(part_idx_ptr + row * n_chunks + chunk, first)
    tl.debug_barrier()  # the partials are stored before the arrival is released
    arrived = tl.atomic_add(cnt_ptr + row, 1, sem="acq_rel", scope="gpu")
    if arrived == n_chunks - 1:
        c = tl.arange(0, CHUNKS_P2)
        mc = c < n_chunks
        bests = tl.load(part_ptr + (row * n_chunks + c) * 3, mask=mc, other=float("-inf"), cache_modifier=".cg")
        ms = tl.load(part_ptr + (row * n_chunks + c) * 3 + 1, mask=mc, other=float("-inf"), cache_modifier=".cg")
        ss = tl.load(part_ptr + (row * n_chunks + c) * 3 + 2, mask=mc, other=0., cache_modifier=".cg")
        idx = tl.load(part_idx_ptr + row * n_chunks + c, mask=mc, other=n_valid, cache_modifier=".cg")
        token = tl.min(tl.where(bests == tl.max(bests, axis=0), idx, n_valid), axis=0)
        top = tl.max(ms, axis=0)
        total = tl.sum(tl.where(ms == float("-inf"), 0., ss * tl.exp(ms - top)), axis=0)
        x_token = tl.load(logits_ptr + row.to(tl.int64) * stride_row + token).to(tl.float32)
        x_token = tl.where(x_token != x_token, float("inf"), x_token)
        tl.store(ids_ptr + row, token.to(tl.int64))
        tl.store(logprobs_ptr + row, x_token - top - tl.log(total))
        tl.atomic_xchg(cnt_ptr + row, 0, sem="relaxed", scope="gpu")


def _check_rows(name: str, t: Tensor, dtype, B: int, dev) -> None:
    if t.dtype != dtype or tuple(t.shape) != (B,) or t.device != dev or not t.is_contiguous():
        raise ValueError(f"{name}: expected contiguous {dtype} [{B}] on {dev}, got {t.dtype} {list(t.shape)} "
                         f"on {t.device}")


def token_sample(logits: Tensor, n_valid: int, temperature: Tensor, greedy: Tensor, seeds: Tensor, steps: Tensor,
                 counters: Tensor, top_p: Tensor | None = None, chunk: int = CHUNK) -> tuple[Tensor, Tensor]:
    """Returns (token_ids [B] int64, logprobs [B] float32).

    logits: [B, V] float rows (contiguous columns, rows may be strided); n_valid: ids below it may
    be chosen (1 <= n_valid <= V); temperature [B] float32 (> 0 on sampled rows), greedy [B] bool,
    seeds and steps [B] int64; counters: int32 zeros [>= B] (`dispatch.greedy_counters`), left
    zero; top_p: [B] float32 in (0, 1] (`kernels.top_p_threshold`; float16 or bfloat16 logits
    only), None: no row truncates; chunk: logits per program, a power of two (tests use small ones
    to combine many chunks)."""
    if logits.dim() != 2 or logits.dtype not in _FLOATS or logits.stride(1) != 1:
        raise ValueError(f"logits: expected a float [B, V] matrix with contiguous columns, got "
                         f"{list(logits.shape)} {logits.dtype}")
    B, V = logits.shape
    if not 1 <= n_valid <= V:
        raise ValueError(f"n_valid: {n_valid} not in [1, {V}]")
    dev = logits.device
    for name, t, dt in (("temperature", temperature, torch.float32), ("greedy", greedy, torch.bool),
                        ("seeds", seeds, torch.int64), ("steps", steps, torch.int64)):
        _check_rows(name, t, dt, B, dev)
    if top_p is not None:
        _check_rows("top_p", top_p, torch.float32, B, dev)
        if logits.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"logits: top_p needs float16 or bfloat16 logits (16-bit keys), got {logits.dtype}")
    if counters.dtype != torch.int32 or counters.dim() != 1 or counters.numel() < B or counters.device != dev:
        raise ValueError(f"counters: expected int32 [>= {B}] on {dev}, got {counters.dtype} "
                         f"{list(counters.shape)} on {counters.device}")
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk: {chunk} is not a power of two >= 16")
    n_chunks = triton.cdiv(n_valid, chunk)
    token_ids = torch.empty(B, dtype=torch.int64, device=dev)
    logprobs = torch.empty(B, dtype=torch.float32, device=dev)
    min_keys = torch.zeros(B, dtype=torch.int32, device=dev)
    if top_p is not None:
        top_p_min_keys(logits, n_valid, temperature, top_p, greedy, min_keys, chunk)
    partials = torch.empty(B * n_chunks * 3, dtype=torch.float32, device=dev)
    partial_ids = torch.empty(B * n_chunks, dtype=torch.int32, device=dev)
    token_sample_fwd_kernel[(B, n_chunks)](
        logits, logits.stride(0), temperature, greedy, seeds, steps, top_p if top_p is not None else temperature,
        min_keys, partials, partial_ids, counters, token_ids, logprobs, n_valid, n_chunks, CHUNK=chunk,
        CHUNKS_P2=max(2, triton.next_power_of_2(n_chunks)), HAS_TOP_P=top_p is not None, num_warps=4)
    return token_ids, logprobs
