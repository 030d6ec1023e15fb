"""Greedy sampling inside the decode step: the argmax of each row's logits and its raw log-prob
(contract: `kernels.greedy_sample_reference`).

Why: outside the decode step's CUDA graph, a greedy batch-1 step ran ~10 small launches after it
(the logits' float32 copy, the sampler's parameter copies, log_softmax, argmax, gather; H100, 1.5B
shape, 4K context: 54 us of sampler and 32 us between it and the graphs for a 1.65 ms step). Here
one kernel in the graph gives both, so the host only copies back two numbers a row.

`greedy_sample_fwd_kernel`, grid (B, n_chunks): a program reads one CHUNK of a row and stores its
maximum, its first index of that maximum and its sum of exp(x - maximum); the last program of a row
to arrive at the row's counter (acq_rel atomic) combines the chunks in chunk order (the first index
of the maximum over the row, and the log-sum-exp: the same result whatever the arrival order),
stores the token and log-prob, and sets the counter back to 0 for the next call. It runs in every
decode graph, whether or not the step's rows turn out greedy (a few microseconds at batch 1: the
sampled step's graph measured the same, 1.623 ms against 1.630 greedy).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from torch import Tensor

from . import pdl

CHUNK = 2048  # logits a program reads (32 programs a row at a 65,536 vocabulary)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def greedy_sample_fwd_kernel(logits_ptr, stride_row, part_ptr, part_idx_ptr, cnt_ptr, ids_ptr, logprobs_ptr,
                             n_valid, n_chunks, CHUNK: tl.constexpr, CHUNKS_P2: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    if PDL:
        gdc_wait()  # the logits are the kernel before's
        gdc_launch_dependents()
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + cols, mask=cols < n_valid,
                other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # a NaN is chosen, as torch.argmax chooses it
    m = tl.max(x, axis=0)
    first = tl.min(tl.where(x == m, cols, n_valid), axis=0)
    s = tl.sum(tl.where(x == float("-inf"), 0., tl.exp(x - m)), axis=0)
    tl.store(part_ptr + (row * n_chunks + chunk) * 2, m)
    tl.store(part_ptr + (row * n_chunks + chunk) * 2 + 1, s)
    tl.store(part_idx_ptr + row * n_chunks + chunk, first)
    tl.debug_barrier()  # the partials are stored before the arrival is released
    arrived = tl.atomic_add(cnt_ptr + row, 1, sem="acq_rel", scope="gpu")
    if arrived == n_chunks - 1:
        c = tl.arange(0, CHUNKS_P2)
        mc = c < n_chunks
        ms = tl.load(part_ptr + (row * n_chunks + c) * 2, mask=mc, other=float("-inf"), cache_modifier=".cg")
        ss = tl.load(part_ptr + (row * n_chunks + c) * 2 + 1, mask=mc, other=0., cache_modifier=".cg")
        idx = tl.load(part_idx_ptr + row * n_chunks + c, mask=mc, other=n_valid, cache_modifier=".cg")
        top = tl.max(ms, axis=0)
        token = tl.min(tl.where(ms == top, idx, n_valid), axis=0)
        total = tl.sum(tl.where(ms == float("-inf"), 0., ss * tl.exp(ms - top)), axis=0)
        tl.store(ids_ptr + row, token.to(tl.int64))
        tl.store(logprobs_ptr + row, -tl.log(total))  # x[token] - top - log(total), x[token] == top
        tl.atomic_xchg(cnt_ptr + row, 0, sem="relaxed", scope="gpu")


def greedy_sample(logits: Tensor, n_valid: int, counters: Tensor, token_ids: Tensor | None = None,
                  logprobs: Tensor | None = None, chunk: int = CHUNK) -> tuple[Tensor, Tensor]:
    """Returns (token_ids [B] int64, logprobs [B] float32), written into the given tensors if any.

    logits: [B, V] float rows (contiguous columns, rows may be strided); n_valid: ids below it may
    be chosen (1 <= n_valid <= V); counters: int32 zeros [>= B] (`dispatch.greedy_counters`), left zero;
    chunk: logits per program, a power of two (tests use small ones to combine many chunks)."""
    if logits.dim() != 2 or logits.dtype not in _FLOATS or logits.stride(1) != 1:
        raise ValueError(f"logits: expected a float [B, V] matrix with contiguous columns, got "
                         f"{list(logits.shape)} {logits.dtype}")
    B, V = logits.shape
    if not 1 <= n_valid <= V:
        raise ValueError(f"n_valid: {n_valid} not in [1, {V}]")
    dev = logits.device
    if counters.dtype != torch.int32 or counters.dim() != 1 or counters.numel() < B or counters.device != dev:
        raise ValueError(f"counters: expected int32 [>= {B}] on {dev}, got {counters.dtype} "
                         f"{list(counters.shape)} on {counters.device}")
    token_ids = torch.empty(B, dtype=torch.int64, device=dev) if token_ids is None else token_ids
    logprobs = torch.empty(B, dtype=torch.float32, device=dev) if logprobs is None else logprobs
    for name, t, dt in (("token_ids", token_ids, torch.int64), ("logprobs", logprobs, torch.float32)):
        if t.dtype != dt or tuple(t.shape) != (B,) or t.device != dev or not t.is_contiguous():
            raise ValueError(f"{name}: expected contiguous {dt} [{B}] on {dev}, got {t.dtype} {list(t.shape)}")
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk: {chunk} is not a power of two >= 16")
    n_chunks = triton.cdiv(n_valid, chunk)
    partials = torch.empty(B * n_chunks * 2, dtype=torch.float32, device=dev)
    partial_ids = torch.empty(B * n_chunks, dtype=torch.int32, device=dev)
    use_pdl = pdl.enabled(dev, B)
    greedy_sample_fwd_kernel[(B, n_chunks)](
        logits, logits.stride(0), partials, partial_ids, counters, token_ids, logprobs, n_valid, n_chunks,
        CHUNK=chunk, CHUNKS_P2=max(2, triton.next_power_of_2(n_chunks)), PDL=use_pdl, num_warps=4,
        **pdl.launch_options(use_pdl))
    return token_ids, logprobs
