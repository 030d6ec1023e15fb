"""Which implementation runs (WKV6, paged decode attention, GOLD key/value derivation, prompt-tail
attention, Finch token-shift mixes, the decode step's fused norms, products and WKV step): the
Triton kernels on CUDA tensors, the PyTorch reference elsewhere.

Set `GOLDFINCH_KERNELS=reference` to force the reference on CUDA as well (debugging, A/B checks).
The Triton modules are imported only when a CUDA tensor first arrives, so the CPU path needs no
Triton and a CPU process never compiles anything.
"""
from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from .decode_gemv_reference import ColumnSegments, decode_gemv_reference, decode_norm_mix_reference
from .finch_mix_reference import finch_mix_reference
from .finch_wkv_decode_reference import finch_wkv_decode_reference
from .gold_kv_derive_reference import GoldKVDeriveWeights, gold_kv_derive_reference
from .greedy_sample_reference import greedy_sample_reference
from .paged_attention_reference import paged_decode_attention_reference
from .tail_attention_reference import tail_attention_reference
from .token_sample_reference import token_sample_reference
from .wkv6_plan import ChunkPlan
from .wkv6_reference import wkv6_chunked, wkv6_step

ENV_VAR = "GOLDFINCH_KERNELS"


def use_triton(t: Tensor) -> bool:
    """True when `t` lives on a CUDA device and the reference is not forced."""
    return t.is_cuda and os.environ.get(ENV_VAR, "").strip().lower() != "reference"


def wkv_decode(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state_pool: Tensor,
               slots: Tensor) -> Tensor:
    """One token for each of N sequences. r, k, w: [N, H, K]; v: [N, H, V]; u: [H, K];
    state_pool: [S, H, K, V] float32, updated in place at `slots` ([N], distinct).
    Returns y [N, H, V] in r's dtype."""
    if use_triton(r):
        from .wkv6_decode import wkv6_decode

        return wkv6_decode(r, k, v, w, u, state_pool, slots)
    return wkv6_step(r, k, v, w, u, state_pool, slots)


def wkv_prefill(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, cu_seqlens,
                state_pool: Tensor, slots: Tensor) -> Tensor:
    """B packed sequences. r, k, w: [T, H, K]; v: [T, H, V]; u: [H, K]; cu_seqlens: [B + 1] (a
    tensor or ints), or a `kernels.wkv6_plan.ChunkPlan` (one sequence whose length is on the
    device; rows past it are zero in y); state_pool: [S, H, K, V] float32, read at and written back
    to `slots` ([B], distinct). Returns y [T, H, V] in r's dtype."""
    if use_triton(r):
        from .wkv6_prefill import wkv6_prefill

        return wkv6_prefill(r, k, v, w, u, cu_seqlens, state_pool, slots)
    if isinstance(cu_seqlens, ChunkPlan):
        cu_seqlens = cu_seqlens.cu_seqlens  # the reference reads it back (not for CUDA graphs)
    cu = [int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else cu_seqlens)]
    if len(cu) != slots.shape[0] + 1:
        raise ValueError(f"cu_seqlens has {len(cu)} entries for {slots.shape[0]} slots")
    y = torch.zeros(v.shape, dtype=r.dtype, device=r.device)
    for b, (start, end) in enumerate(zip(cu, cu[1:])):
        if end == start:
            continue
        sl, slot = slice(start, end), slots[b]
        out, state = wkv6_chunked(r[sl][None], k[sl][None], v[sl][None], w[sl][None], u, state_pool[slot][None])
        state_pool[slot] = state[0]
        y[sl] = out[0]
    return y


# (sequence, head, split) programs per multiprocessor that the default split aims at; 2 with the
# 3-stage page loop was best or within 3% of best in the H200 sweep (bench_paged_attention.py)
SPLIT_WAVES = 2
MAX_SPLITS = 64


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100 SXM


def default_num_splits(batch: int, heads: int, max_pages: int, sms: int = 132) -> int:
    """Splits per (sequence, head) for paged decode attention: the next power of two of
    ceil(SPLIT_WAVES * sms / (batch * heads)), so that the grid fills every multiprocessor a few
    times over, clamped to [1, MAX_SPLITS] and to the pages a sequence can have (max_pages). Depends
    on shapes only, so a CUDA graph captured at one batch size keeps its grid."""
    want = -(-SPLIT_WAVES * sms // max(1, batch * heads))
    splits = 1 << (want - 1).bit_length()  # next power of two (1 -> 1)
    return max(1, min(splits, MAX_SPLITS, max_pages))


def paged_attention(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_tables: Tensor, seq_lens: Tensor,
                    num_splits: int | None = None, scale: float | None = None) -> Tensor:
    """Decode attention over paged keys/values. q: [B, H, D]; k_pages, v_pages: [num_blocks, page_size,
    H, D]; block_tables: [B, max_pages] int32; seq_lens: [B] int32 (0: a zero row). Returns [B, H, D]
    in q's dtype. num_splits (Triton only) defaults to `default_num_splits` for the batch and the
    device's multiprocessors; scale to 1/sqrt(D)."""
    if use_triton(q):
        from .paged_attention import paged_decode_attention

        if num_splits is None:
            num_splits = default_num_splits(q.shape[0], q.shape[1], block_tables.shape[-1], _sm_count(q.device))
        return paged_decode_attention(q, k_pages, v_pages, block_tables, seq_lens, num_splits, scale)
    return paged_decode_attention_reference(q, k_pages, v_pages, block_tables, seq_lens, scale)


def gold_kv_derive(proto_keys: Tensor, prev_proto_keys: Tensor, token_values: Tensor, prev_token_values: Tensor,
                   weights: GoldKVDeriveWeights, row_slots: Tensor, key_pages: Tensor,
                   value_pages: Tensor) -> tuple[Tensor, Tensor]:
    """One GOLD layer's keys and values [N, C] of packed rows (each given with its predecessor's
    inputs), also stored to flat page rows `row_slots` [N] (-1: not stored) of key_pages /
    value_pages [S, C]. See `kernels.gold_kv_derive_reference`."""
    if use_triton(proto_keys):
        from .gold_kv_derive import gold_kv_derive as derive

        return derive(proto_keys, prev_proto_keys, token_values, prev_token_values, weights, row_slots,
                      key_pages, value_pages)
    return gold_kv_derive_reference(proto_keys, prev_proto_keys, token_values, prev_token_values, weights,
                                    row_slots, key_pages, value_pages)


def tail_attention(q: Tensor, keys: Tensor, values: Tensor, q_positions: Tensor) -> Tensor:
    """Q queries of one sequence over its contiguous keys/values [n, H, D], query i seeing keys
    0..q_positions[i] (int [Q]); returns [Q, H, D] in q's dtype. The split-key Triton kernel on CUDA
    up to `tail_attention.MAX_QUERIES` queries; masked SDPA otherwise."""
    if use_triton(q):
        from .tail_attention import MAX_QUERIES, tail_attention as split_key_attention

        if q.shape[0] <= MAX_QUERIES:
            return split_key_attention(q, keys, values, q_positions)
    return tail_attention_reference(q, keys, values, q_positions)


# A custom op, so that `torch.compile` (the layer functions of `engine.layer_ops`) treats the kernel
# as one opaque call with a known output shape and fuses what is around it
@torch.library.custom_op("goldfinch::finch_mix", mutates_args=())
def finch_mix(x: Tensor, prev: Tensor, h: Tensor, w2: Tensor, maa: Tensor, shifted: bool) -> Tensor:
    """A Finch time mix's n_mix mixed inputs [n_mix, N, C]: x [N, C]; prev [N, C] (each row's
    previous row), or with `shifted` [1, C] (x is one sequence); h [N, n_mix * R]; w2 [n_mix, R, C];
    maa [n_mix, C]. See `kernels.finch_mix_reference`."""
    if use_triton(x):
        from .finch_mix import finch_mix as fused

        return fused(x, prev, h, w2, maa, shifted)
    return finch_mix_reference(x, prev, h, w2, maa, shifted)


@finch_mix.register_fake
def _finch_mix_shape(x: Tensor, prev: Tensor, h: Tensor, w2: Tensor, maa: Tensor, shifted: bool) -> Tensor:
    return x.new_empty((w2.shape[0], *x.shape))


def plan_columns(segments: ColumnSegments, K: int, device: torch.device):
    """What `decode_gemv` takes for a weight [segments.ends[-1], K] read by several input groups:
    the Triton kernel's block table on CUDA (built once per weight), the segments elsewhere."""
    if device.type == "cuda" and os.environ.get(ENV_VAR, "").strip().lower() != "reference":
        from .decode_gemv import plan_columns as plan

        return plan(segments, K, device)
    return segments


def decode_gemv(x: Tensor, weight: Tensor, out: Tensor, batch: int, plan=None, split_counters: Tensor | None = None,
                **fused) -> Tensor:
    """A decode step's skinny product with its activation or residual fused in; see
    `kernels.decode_gemv_reference` (the arguments) and `plan_columns` (plan). split_counters
    (`split_counters`): lets the Triton kernel split a long K over more programs (the sum is the
    same up to the order of its float32 additions). Writes and returns out."""
    if use_triton(x) and not isinstance(plan, ColumnSegments):
        from .decode_gemv import decode_gemv as fused_gemv

        return fused_gemv(x, weight, out, batch, plan, split_counters=split_counters, **fused)
    segments = plan if plan is None or isinstance(plan, ColumnSegments) else plan.segments
    return decode_gemv_reference(x, weight, out, batch, segments, **fused)


def split_counters(device) -> Tensor:
    """The arrival counters that split-K decode products share (one buffer per device and step
    runner: every call leaves them zero)."""
    from .decode_gemv import new_split_counters

    return new_split_counters(device)


def decode_norm_mix(x: Tensor, ln: tuple[Tensor, Tensor, float], ln_out: Tensor | None = None,
                    prev: Tensor | None = None, mix: Tensor | None = None, out: Tensor | None = None,
                    addend: Tensor | None = None, lora_w1t: Tensor | None = None,
                    lora_out: Tensor | None = None) -> None:
    """A decode step's layer norm (of x + addend), the token-shift mixes after it and a LoRA's first
    stage on the first mix; see `kernels.decode_gemv_reference`. Writes ln_out, out and lora_out."""
    args = (x, ln, ln_out, prev, mix, out, addend, lora_w1t, lora_out)
    if use_triton(x):
        from .decode_norm_mix import decode_norm_mix as fused

        return fused(*args)
    return decode_norm_mix_reference(*args)


def finch_wkv_decode(r: Tensor, k: Tensor, v: Tensor, decay_hidden: Tensor, time_decay: Tensor, decay_w2: Tensor,
                     u: Tensor, state_pool: Tensor, slots: Tensor, use_one_minus_w: bool, v2: Tensor | None = None,
                     value2_hidden: Tensor | None = None, value2_w2: Tensor | None = None) -> Tensor:
    """A Finch-C2 time mix's step from its projections to its output norm's input (decay LoRA,
    key scaling, WKV step on the state slots in place, value2 term); see
    `kernels.finch_wkv_decode_reference`. Returns [N, A]."""
    args = (r, k, v, decay_hidden, time_decay, decay_w2, u, state_pool, slots, use_one_minus_w, v2, value2_hidden,
            value2_w2)
    if use_triton(r):
        from .finch_wkv_decode import finch_wkv_decode as fused

        return fused(*args)
    return finch_wkv_decode_reference(*args)


def greedy_sample(logits: Tensor, n_valid: int, counters: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Each row's argmax over ids below n_valid and its raw log-prob: (token_ids [B] int64,
    logprobs [B] float32); see `kernels.greedy_sample_reference`. counters (`greedy_counters`, at
    least B) are what the Triton kernel's programs of a row meet at; the reference ignores them."""
    if use_triton(logits):
        from .greedy_sample import greedy_sample as fused

        if counters is None:
            raise ValueError("counters: required on CUDA (greedy_counters)")
        return fused(logits, n_valid, counters)
    return greedy_sample_reference(logits, n_valid)


def token_sample(logits: Tensor, n_valid: int, temperature: Tensor, greedy: Tensor, seeds: Tensor, steps: Tensor,
                 counters: Tensor | None = None, top_p: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Each row's seeded draw (greedy rows: argmax) over ids below n_valid, truncated to its top-p
    set where top_p is given, and its raw log-prob: (token_ids [B] int64, logprobs [B] float32);
    see `kernels.token_sample_reference`. counters (`greedy_counters`, at least B): as greedy_sample."""
    if use_triton(logits):
        from .token_sample import token_sample as fused

        if counters is None:
            raise ValueError("counters: required on CUDA (greedy_counters)")
        return fused(logits, n_valid, temperature, greedy, seeds, steps, counters, top_p=top_p)
    return token_sample_reference(logits, n_valid, temperature, greedy, seeds, steps, top_p)


def greedy_counters(device, rows: int) -> Tensor:
    """Arrival counters for `greedy_sample` over up to `rows` rows (every call leaves them zero)."""
    return torch.zeros(rows, dtype=torch.int32, device=device)
