"""Materialised per-layer keys and values of running sequences, paged: the fast decode cache mode.

The compressed cache (260 B/token at the 1.5B shape) stays the one persistent store. For a sequence
that is decoding, re-deriving every GOLD layer's keys and values for its whole history at each step
costs ~94 MFLOP per cached token; keeping them (n_gold x 2 x n_embd values, 64 KB/token at the
1.5B shape) turns a step's derivation into the new tokens' only. A working set is derived data: it
can be dropped at any time (preemption, memory pressure, a session handing the state on) and is
rebuilt from the compressed cache when the sequence runs again.

Working sets live in one preallocated paged pool (`PagedKVPool`, like a transformer's paged KV
cache), so a decode step reads them through page tables with one attention kernel for the whole
batch, and a CUDA graph can replay it. `WorkingSetManager` is the bookkeeping: plain Python, FIFO
free list of page ids 0..n-1 (exact ids are testable), one `WorkingSet` per sequence.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .host_copy import to_device


@dataclass
class WorkingSet:
    """One sequence's pages; positions [0, length) hold valid keys and values of every GOLD layer."""

    pages: list[int] = field(default_factory=list)
    length: int = 0


class PagedKVPool:
    """keys / values [n_gold, num_pages + 1, page_size, C] (keys already rotated when the model
    uses rotary). The extra last page is scratch: padded rows of a CUDA-graph batch write there."""

    def __init__(self, n_gold: int, num_pages: int, page_size: int, width: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.page_size = page_size
        # uninitialised: every position is written before it is read (untouched host pages of a large
        # CPU pool are then never even committed)
        self.keys = torch.empty(n_gold, num_pages + 1, page_size, width, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self.scratch_page = num_pages
        self.keys[:, num_pages].zero_()
        self.values[:, num_pages].zero_()

    @property
    def num_pages(self) -> int:
        return self.scratch_page

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def layer(self, j: int, n_head: int) -> tuple[Tensor, Tensor]:
        """Layer j's pages as [num_pages + 1, page_size, H, D] views (what the attention kernel reads)."""
        n, p, c = self.keys.shape[1:]
        return self.keys[j].view(n, p, n_head, c // n_head), self.values[j].view(n, p, n_head, c // n_head)

    def flat_layer(self, j: int) -> tuple[Tensor, Tensor]:
        """Layer j's keys and values as [num_slots, C] views (flat row = page * page_size + offset)."""
        c = self.keys.shape[-1]
        return self.keys[j].view(-1, c), self.values[j].view(-1, c)

    def flat_all_layers(self) -> tuple[Tensor, Tensor]:
        """Every layer's keys and values as [n_gold, num_slots, C] views."""
        n, c = self.keys.shape[0], self.keys.shape[-1]
        return self.keys.view(n, -1, c), self.values.view(n, -1, c)

    def flat_slot_array(self, pages: list[int], start: int, end: int) -> np.ndarray:
        """Flat row index (page * page_size + offset) of positions [start, end) of a page table,
        on the host (a step packs several sequences' into one copy)."""
        pos = np.arange(start, end)
        return np.asarray(pages, dtype=np.int64)[pos // self.page_size] * self.page_size + pos % self.page_size

    def flat_slots(self, pages: list[int], start: int, end: int) -> Tensor:
        """`flat_slot_array` on the pool's device."""
        return to_device(self.flat_slot_array(pages, start, end), torch.long, self.device)

    def write(self, j: int, slots: Tensor, keys: Tensor, values: Tensor) -> None:
        """Stores rows of layer j at flat slots."""
        self.keys[j].view(-1, self.keys.shape[-1]).index_copy_(0, slots, keys.to(self.keys.dtype))
        self.values[j].view(-1, self.values.shape[-1]).index_copy_(0, slots, values.to(self.values.dtype))

    def write_all_layers(self, slots: Tensor, keys: Tensor, values: Tensor) -> None:
        """Stores rows of every layer at the same flat slots (keys, values: [n_gold, N, C]): one copy
        each for keys and values instead of one per layer."""
        n, c = self.keys.shape[0], self.keys.shape[-1]
        self.keys.view(n, -1, c).index_copy_(1, slots, keys.to(self.keys.dtype))
        self.values.view(n, -1, c).index_copy_(1, slots, values.to(self.values.dtype))

    def gather(self, j: int, pages: list[int], length: int) -> tuple[Tensor, Tensor]:
        """Layer j's keys and values of positions [0, length) of a page table, contiguous."""
        slots = self.flat_slots(pages, 0, length)
        return (self.keys[j].view(-1, self.keys.shape[-1]).index_select(0, slots),
                self.values[j].view(-1, self.values.shape[-1]).index_select(0, slots))


class WorkingSetManager:
    """Gives running sequences working sets while free pages last; the rest derive per step."""

    def __init__(self, n_gold: int, width: int, dtype: torch.dtype, device: torch.device | str,
                 budget_bytes: int, page_size: int = 64) -> None:
        elt = torch.empty(0, dtype=dtype).element_size()
        self.bytes_per_token = 2 * n_gold * width * elt
        self.page_size = page_size
        num_pages = max(0, int(budget_bytes) // (self.bytes_per_token * page_size) - 1)  # one is scratch
        self.pool = PagedKVPool(n_gold, num_pages, page_size, width, dtype, device)
        self._free: deque[int] = deque(range(num_pages))
        self._sets: dict[object, WorkingSet] = {}
        self.num_created = 0
        self.num_dropped_over_budget = 0

    # ---- counters ------------------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def used_bytes(self) -> int:
        return (self.num_pages - self.num_free_pages) * self.page_size * self.bytes_per_token

    def __len__(self) -> int:
        return len(self._sets)

    def get(self, owner) -> WorkingSet | None:
        return self._sets.get(owner)

    # ---- per step ------------------------------------------------------------------------------
    def for_step(self, owners: list, needed: list[int]) -> list[WorkingSet | None]:
        """Working sets for one step's sequences, each with pages for `needed[i]` positions (its
        length after the step). Sets of sequences no longer on the device are dropped first; a
        sequence whose set cannot grow loses it and derives per step from then on."""
        for owner in [o for o in self._sets if getattr(o, "state_slot", None) is None]:
            self.drop(owner)
        out: list[WorkingSet | None] = []
        for owner, n in zip(owners, needed):
            ws = self._sets.get(owner)
            missing = -(-n // self.page_size) - (len(ws.pages) if ws else 0)
            if missing > len(self._free):
                if ws is not None:
                    self.drop(owner)
                    self.num_dropped_over_budget += 1
                out.append(None)
                continue
            if ws is None:
                ws = self._sets[owner] = WorkingSet()
                self.num_created += 1
            ws.pages.extend(self._free.popleft() for _ in range(max(0, missing)))
            out.append(ws)
        return out

    def drop(self, owner) -> None:
        ws = self._sets.pop(owner, None)
        if ws is not None:
            self._free.extend(ws.pages)
            ws.pages, ws.length = [], 0

    def check_integrity(self) -> None:
        """Every page is free or in exactly one set."""
        held = [p for ws in self._sets.values() for p in ws.pages]
        if len(set(held)) != len(held) or set(held) & set(self._free):
            raise AssertionError("a working-set page is held twice or both held and free")
        if len(held) + len(self._free) != self.num_pages:
            raise AssertionError(f"{len(held)} held + {len(self._free)} free pages != {self.num_pages}")
