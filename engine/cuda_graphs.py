"""CUDA graphs of the decode step, one per batch size, so that a small batch costs its GPU time and
not the ~1,000 kernel launches Python would issue for it.

Inputs go through static buffers: a batch of n sequences replays the graph of the smallest captured
size >= n, with rows n.. padded to scratch (a state slot, a compressed-key slot and a working-set
page that no sequence owns) and 0 keys to attend to. Page tables are as wide as `max_model_len`
needs, so any context fits the same graph.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .decode_step import DecodeInputs, DecodeOutput, DecodeStep

log = logging.getLogger("goldfinch.engine")

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)


@dataclass(frozen=True)
class DecodeRows:
    """Host-side values of one decode step, one entry per sequence (what the runner knows)."""

    token_ids: list[int]
    state_slots: list[int]
    positions: list[int]
    key_slots: list[int]
    prev_key_slots: list[int]
    kv_slots: list[int]
    page_tables: list[list[int]]

    @property
    def size(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Scratch:
    state_slot: int
    key_slot: int
    kv_slot: int


_COLUMNS = ("token_ids", "state_slots", "positions", "key_slots", "prev_key_slots", "kv_slots")


def host_inputs(rows: DecodeRows, batch: int, width: int, scratch: Scratch) -> tuple[Tensor, Tensor]:
    """([7, batch] int64: the columns and seq_lens, each contiguous as kernels read them;
    [batch, width] int32 page tables) with rows past `rows.size` padded to scratch. Built in numpy:
    this runs on the host every step while the GPU waits."""
    n = rows.size
    if n > batch:
        raise ValueError(f"{n} rows do not fit a batch of {batch}")
    cols = np.empty((len(_COLUMNS) + 1, batch), dtype=np.int64)
    for c, name in enumerate(_COLUMNS):
        cols[c, :n] = getattr(rows, name)
    cols[-1, :n] = cols[2, :n] + 1  # keys attended: every position up to the new one
    cols[:, n:] = np.array([0, scratch.state_slot, 0, scratch.key_slot, scratch.key_slot, scratch.kv_slot, 0])[:, None]
    tables = np.zeros((batch, width), dtype=np.int32)
    for i, pages in enumerate(rows.page_tables):
        tables[i, : len(pages)] = pages
    return torch.from_numpy(cols), torch.from_numpy(tables)


def to_inputs(cols: Tensor, tables: Tensor) -> DecodeInputs:
    return DecodeInputs(*(cols[c] for c in range(len(_COLUMNS))), kv_page_tables=tables, seq_lens=cols[-1])


def capture_one(fn, pool) -> tuple[torch.cuda.CUDAGraph, object]:
    """A CUDA graph of one call of `fn` (no arguments, returns its output tensors) and that output, in `pool`:
    `fn` first runs twice on a side stream, which compiles its kernels and sizes the allocator."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def run_eager(step: DecodeStep, rows: DecodeRows, scratch: Scratch, device: torch.device,
              token_ids: Tensor | None = None) -> DecodeOutput:
    """The decode step without a graph (CPU, or graphs turned off): exact batch, tables as wide as
    the longest. `token_ids` [n] on the device replace the rows' token ids (engine.overlap)."""
    cols, tables = host_inputs(rows, rows.size, max(len(p) for p in rows.page_tables), scratch)
    cols = cols.to(device)
    if token_ids is not None:
        cols[0].copy_(token_ids)
    return step.with_greedy(to_inputs(cols, tables.to(device)))


class DecodeGraphs:
    def __init__(self, step: DecodeStep, max_batch: int, max_pages: int, scratch: Scratch,
                 batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES) -> None:
        self.step, self.scratch, self.max_pages = step, scratch, max_pages
        self.sizes = sorted({b for b in batch_sizes if b < max_batch} | {max_batch})
        device = step.model.device
        self._cols = torch.zeros(len(_COLUMNS) + 1, self.sizes[-1], dtype=torch.long, device=device)
        self._tables = torch.zeros(self.sizes[-1], max_pages, dtype=torch.int32, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, DecodeOutput]] = {}

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _static(self, b: int) -> DecodeInputs:
        c = self._cols
        # seq_lens: the int64 row of the columns as copied (an int32 copy would cost a step another
        # transfer and a conversion kernel before the graph)
        return DecodeInputs(*(c[i, :b] for i in range(len(_COLUMNS))), kv_page_tables=self._tables[:b],
                            seq_lens=c[-1, :b])

    def capture(self) -> float:
        """Captures every size, largest first (later ones reuse its memory pool); returns seconds."""
        started = time.perf_counter()
        self._fill(DecodeRows([], [], [], [], [], [], []), self.max_batch)  # all scratch
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.sizes):
            inp = self._static(b)
            self._graphs[b] = capture_one(lambda: self.step.with_greedy(inp), pool)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        log.info("captured decode CUDA graphs for batch sizes %s in %.1f s", list(self.sizes), seconds)
        return seconds

    def _fill(self, rows: DecodeRows, b: int) -> None:
        """Writes the step's inputs into the static buffers. Only the page-table columns this batch
        uses are copied: entries past a row's last page are never read (the kernel stops at
        seq_len), so the rest may hold an earlier step's pages, and a step does not pay for a table
        as wide as max_model_len."""
        width = max((len(p) for p in rows.page_tables), default=0)
        cols, tables = host_inputs(rows, b, max(width, 1), self.scratch)
        if self._cols.is_cuda:
            cols, tables = cols.pin_memory(), tables.pin_memory()  # queued copies, no stall (host_copy.py)
        self._cols[:, :b].copy_(cols, non_blocking=True)
        if width:
            self._tables[:b, :width].copy_(tables[:, :width], non_blocking=True)

    def run(self, rows: DecodeRows, token_ids: Tensor | None = None) -> DecodeOutput:
        """The n sequences' logits [n, V] and greedy choices (views into the graph's output, valid
        until the next run).
        `token_ids` [n] on the device replace the rows' token ids (engine.overlap)."""
        if rows.size > self.max_batch:
            raise ValueError(f"batch of {rows.size} exceeds the largest graph ({self.max_batch})")
        if any(len(p) > self.max_pages for p in rows.page_tables):
            raise ValueError(f"a page table is longer than the graphs' {self.max_pages} pages")
        b = next(s for s in self.sizes if s >= rows.size)
        self._fill(rows, b)
        if token_ids is not None:
            self._cols[0, : rows.size].copy_(token_ids)  # queued after the sampler that made them
        graph, out = self._graphs[b]
        graph.replay()
        return out.rows(rows.size)
