"""CUDA graphs of the Finch layers of one sequence's prompt chunk, one per chunk-length bucket.

Why: a prompt chunk issues ~1,500 kernels from Python whatever its length, and a short one is bound
by that. On an H100 (1.5B shape) the engine prefilled at 30-52K tok/s with its default 2,048-token
chunks, against 133K for a 64K prompt in one step (`bench_engine_prefill.py`; 158K through
`model.forward`). Replayed, a
chunk's Finch layers cost their GPU time; the compressed-key write and, on a prompt's last chunk,
the GOLD layers (a few positions) still run from Python, queued behind the replay.

Padding: a chunk of T tokens replays the smallest bucket P >= T, rows T..P padding. Every op of a
Finch layer is row by row except two, and both are told where the sequence ends: the token shift
reads the row before (padding never precedes a real row; the carried rows are taken at row T-1),
and the WKV recurrence gets `cu_seqlens` [0, T] from a device-side `ChunkPlan` (padded rows join no
sequence and leave the state alone). The graph's input buffers are filled by device copies and
fills: nothing is copied from the host per chunk.
"""
from __future__ import annotations

import logging
import time

import torch
from torch import Tensor

from kernels.wkv6_plan import ChunkPlan

from .cuda_graphs import capture_one
from .state import RNNStatePool

log = logging.getLogger("goldfinch.engine")

# Largest bucket: above it a chunk's kernels are long enough that launching them from Python costs
# little (H100: 8K-token chunks 141.6K tok/s eager, 158K the best one-step figure); buckets cost GPU
# memory for their activations (~0.1 GB per 1K tokens at the 1.5B shape, one pool for all)
MAX_BUCKET_TOKENS = 8192
MIN_BUCKET_TOKENS = 128


def bucket_sizes(max_chunk_tokens: int, smallest: int = MIN_BUCKET_TOKENS,
                 largest: int = MAX_BUCKET_TOKENS) -> tuple[int, ...]:
    """Powers of two from `smallest` up to the first >= max_chunk_tokens (at most `largest`): a
    chunk pads to at most twice its length."""
    sizes, p = [], smallest
    while p <= largest:
        sizes.append(p)
        if p >= max_chunk_tokens:
            break
        p *= 2
    return tuple(sizes)


class PrefillGraphs:
    """Static buffers, a `ChunkPlan` and (on a GPU) a captured graph per bucket; `run` replays the
    one that fits a one-sequence chunk. With `use_graphs=False` the same padded static step runs
    eagerly (the CPU tests check the padding arithmetic that way)."""

    def __init__(self, model, rnn: RNNStatePool, buckets: tuple[int, ...], scratch_state_slot: int,
                 use_graphs: bool = True) -> None:
        if not buckets:
            raise ValueError("buckets: at least one chunk length")
        self.model, self.rnn = model, rnn
        self.buckets = tuple(sorted(buckets))
        self.use_graphs = use_graphs
        device = model.device
        self.token_ids = torch.zeros(self.buckets[-1], dtype=torch.long, device=device)
        self.state_slot = torch.full((1,), scratch_state_slot, dtype=torch.long, device=device)
        self.last_row = torch.zeros(1, dtype=torch.long, device=device)
        self.plans = {p: ChunkPlan.one_sequence(p, device) for p in self.buckets}
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.num_replays = 0

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    def applies(self, query_lens: tuple[int, ...]) -> bool:
        """Whether every sequence's chunk fits a bucket (each is replayed on its own)."""
        return bool(query_lens) and max(query_lens) <= self.max_tokens

    @torch.inference_mode()
    def _finch_layers(self, rows: int) -> Tensor:
        """The capturable step: the Finch layers over the first `rows` static token ids."""
        m = self.model
        x = m.embed(self.token_ids[:rows])
        for layer in range(m.config.n_finch):
            x = m.finch_block_one_sequence(layer, x, self.state_slot, self.rnn, m.ops, self.plans[rows],
                                           self.last_row)
        return x

    def _fill(self, token_ids: Tensor, state_slot: Tensor, rows: int) -> None:
        n = token_ids.shape[0]
        self.token_ids[:n].copy_(token_ids, non_blocking=True)
        self.state_slot.copy_(state_slot.reshape(1), non_blocking=True)
        self.last_row.fill_(n - 1)
        self.plans[rows].set_length(n)

    def capture(self) -> float:
        """Captures every bucket, largest first into one memory pool, on the scratch state slot;
        returns the seconds taken."""
        if not self.use_graphs:
            return 0.0
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for p in reversed(self.buckets):
            self.plans[p].set_length(p)
            self.last_row.fill_(p - 1)
            self._graphs[p] = capture_one(lambda: self._finch_layers(p), pool)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        log.info("captured prefill CUDA graphs for chunks of %s tokens in %.1f s", list(self.buckets), seconds)
        return seconds

    def run(self, token_ids: Tensor, state_slot: Tensor) -> Tensor:
        """The Finch layers' output [T, C] of one sequence's chunk (token_ids [T] on the device, its
        state slot [1]), having updated its RNN state: a view into the bucket's output, valid until
        the next run."""
        n = token_ids.shape[0]
        if not 0 < n <= self.max_tokens:
            raise ValueError(f"chunk of {n} tokens: the prefill graphs take 1 to {self.max_tokens}")
        rows = next(p for p in self.buckets if p >= n)
        self._fill(token_ids, state_slot, rows)
        self.num_replays += 1
        if not self.use_graphs:
            return self._finch_layers(rows)[:n]
        graph, out = self._graphs[rows]
        graph.replay()
        return out[:n]
