"""The tensors of the paged compressed-key pool, and the per-step view the model writes/reads.

Per cached token GoldFinch keeps only its compressed key (`compressed_dim` values, model dtype)
and its token id (int32); everything else is re-derived. The pool holds both for `num_blocks`
blocks of `block_size` tokens. Which blocks a sequence owns is decided by
`engine.block_manager.CachePool`; this module only moves data.

Addressing: position p of a sequence with block table T lives at flat slot
`T[p // block_size] * block_size + p % block_size` of the [num_blocks * block_size] views.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .host_copy import to_device
from .state import TOKEN_ID_DTYPE


# from this many new tokens a sequence's slots are computed in numpy: a 2,048-token chunk's 0.20 ms
# in Python -> 0.05 ms (this runs on the host before a step's first kernel)
VECTORISED_SLOT_ROWS = 256


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def slot_mapping(block_tables: Sequence[Sequence[int]], context_lens: Sequence[int],
                 query_lens: Sequence[int], block_size: int) -> np.ndarray:
    """Flat slots (int64) of positions [ctx, ctx + q) of each sequence, packed in batch order: where
    one step's new tokens go. Raises ValueError if a table does not back its positions."""
    if not len(block_tables) == len(context_lens) == len(query_lens):
        raise ValueError("block_tables, context_lens and query_lens must have one entry per sequence")
    parts: list[np.ndarray] = []
    few: list[int] = []  # consecutive short runs (decodes) in Python, flushed as one part
    for i, (table, ctx, q) in enumerate(zip(block_tables, context_lens, query_lens)):
        if len(table) * block_size < ctx + q:
            raise ValueError(f"sequence {i}: {len(table)} blocks of {block_size} cannot hold "
                             f"{ctx + q} tokens")
        if q < VECTORISED_SLOT_ROWS:
            few.extend(table[p // block_size] * block_size + p % block_size for p in range(ctx, ctx + q))
            continue
        if few:
            parts.append(np.asarray(few, dtype=np.int64))
            few = []
        pos = np.arange(ctx, ctx + q)
        parts.append(np.asarray(table, dtype=np.int64)[pos // block_size] * block_size + pos % block_size)
    parts.append(np.asarray(few, dtype=np.int64))
    return np.concatenate(parts)


class PagedKeyCache:
    """compressed_keys [num_blocks, block_size, Cc] (model dtype) and token_ids
    [num_blocks, block_size] int32, preallocated once so the memory budget is fixed."""

    def __init__(self, num_blocks: int, block_size: int, compressed_dim: int, dtype: torch.dtype,
                 device: str | torch.device = "cpu") -> None:
        self.block_size = block_size
        self.compressed_keys = torch.zeros(num_blocks, block_size, compressed_dim, dtype=dtype, device=device)
        self.token_ids = torch.zeros(num_blocks, block_size, dtype=TOKEN_ID_DTYPE, device=device)

    @property
    def num_blocks(self) -> int:
        return self.compressed_keys.shape[0]

    @property
    def compressed_dim(self) -> int:
        return self.compressed_keys.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.compressed_keys.device

    # ---- sizing ----------------------------------------------------------------------------------
    def persistent_bytes_per_token(self) -> int:
        """Bytes one cached token costs, read off the allocated tensors (Cc * 2 + 4 for bf16)."""
        return (self.compressed_keys.shape[-1] * self.compressed_keys.element_size()
                + self.token_ids.element_size())

    def total_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.compressed_keys, self.token_ids))

    @staticmethod
    def num_blocks_for_budget(budget_bytes: int, block_size: int, compressed_dim: int,
                              dtype: torch.dtype) -> int:
        """How many whole blocks fit in `budget_bytes` (the pool is sized from free memory)."""
        per_token = compressed_dim * _element_size(dtype) + _element_size(TOKEN_ID_DTYPE)
        return max(0, int(budget_bytes) // (per_token * block_size))

    # ---- data movement ---------------------------------------------------------------------------
    def _flat(self) -> tuple[Tensor, Tensor]:
        return self.compressed_keys.view(-1, self.compressed_dim), self.token_ids.view(-1)

    def _positions(self, block_table: Sequence[int] | Tensor, length: int, start: int = 0) -> Tensor:
        """Flat slots of positions [start, length) through `block_table`, on the pool's device."""
        if len(block_table) * self.block_size < length:
            raise ValueError(f"{len(block_table)} blocks of {self.block_size} cannot hold {length} tokens")
        if isinstance(block_table, Tensor) and block_table.device == self.device:
            pos = torch.arange(start, length, device=self.device)
            return block_table[pos // self.block_size] * self.block_size + pos % self.block_size
        table, pos = torch.as_tensor(block_table, dtype=torch.long), torch.arange(start, length)
        return to_device(table[pos // self.block_size] * self.block_size + pos % self.block_size, torch.long,
                         self.device)

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        """Performs the (src, dst) copy-on-write copies asked for by `CachePool.ensure_capacity`."""
        if not copies:
            return
        src = to_device([s for s, _ in copies], torch.long, self.device)
        dst = to_device([d for _, d in copies], torch.long, self.device)
        self.compressed_keys.index_copy_(0, dst, self.compressed_keys.index_select(0, src))
        self.token_ids.index_copy_(0, dst, self.token_ids.index_select(0, src))

    def write(self, slots: Tensor, compressed: Tensor, ids: Tensor) -> None:
        """Stores token k's compressed key and id at flat slot slots[k] (block * block_size + offset)."""
        if not slots.shape[0] == compressed.shape[0] == ids.shape[0]:
            raise ValueError(f"write: {slots.shape[0]} slots for {compressed.shape[0]} keys "
                             f"and {ids.shape[0]} ids")
        keys, tids = self._flat()
        slots = slots.to(device=self.device, dtype=torch.long)
        keys.index_copy_(0, slots, compressed.to(device=self.device, dtype=keys.dtype))
        tids.index_copy_(0, slots, ids.to(device=self.device, dtype=TOKEN_ID_DTYPE))

    def read(self, block_table: Sequence[int] | Tensor, length: int, start: int = 0) -> tuple[Tensor, Tensor]:
        """Positions [start, length) of a sequence gathered through its table."""
        idx = self._positions(block_table, length, start)
        keys, tids = self._flat()
        return keys.index_select(0, idx), tids.index_select(0, idx)

    def export(self, block_table: Sequence[int], length: int,
               device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
        """Host copies of a sequence's history, taken before its blocks are released
        (preemption, sessions); `import_` puts them back into whatever blocks it gets next."""
        keys, ids = self.read(block_table, length)
        return keys.to(device, copy=True), ids.to(device, copy=True)

    def import_(self, block_table: Sequence[int], compressed: Tensor, ids: Tensor) -> None:
        """Writes an exported history into already-allocated blocks, positions [0, len)."""
        self.write(self._positions(block_table, compressed.shape[0]), compressed, ids)


class PagedKeyCacheView:
    """The `KeyCacheView` of one model step over a `PagedKeyCache`.

    Sequence i brings query_lens[i] new tokens after context_lens[i] cached ones; its table must
    already back ctx + q positions with writable (unshared) blocks (`CachePool.ensure_capacity`)."""

    def __init__(self, cache: PagedKeyCache, block_tables: Sequence[Sequence[int]],
                 context_lens: Sequence[int], query_lens: Sequence[int]) -> None:
        self.cache = cache
        self.block_tables = [list(t) for t in block_tables]
        self.context_lens = list(context_lens)
        self.query_lens = list(query_lens)
        mapping = slot_mapping(self.block_tables, self.context_lens, self.query_lens, cache.block_size)
        self.slots = to_device(mapping, torch.long, cache.device)
        width = max((len(t) for t in self.block_tables), default=0)
        # every table in one host-to-device copy (a copy per sequence would stall the GPU each time)
        self._tables = to_device([t + [0] * (width - len(t)) for t in self.block_tables], torch.long, cache.device)
        self._written = False
        # set by the runner when it keeps K/V working sets (engine.kv_working_set)
        self.working_sets: list | None = None
        self.kv_pool = None

    def write(self, compressed_keys: Tensor, token_ids: Tensor) -> None:
        self.cache.write(self.slots, compressed_keys, token_ids)
        self._written = True

    def read(self, i: int) -> tuple[Tensor, Tensor]:
        """History of sequence i including this step's tokens; only valid after `write`."""
        if not self._written:
            raise RuntimeError("read before this step's write: the history would miss its new tokens")
        return self.read_from(i, 0)

    def read_from(self, i: int, start: int) -> tuple[Tensor, Tensor]:
        """Positions [start, ctx + q) of sequence i (the tail that a step with a materialised K/V
        working set needs)."""
        if not self._written:
            raise RuntimeError("read before this step's write: the history would miss its new tokens")
        table = self._tables[i, : len(self.block_tables[i])]
        return self.cache.read(table, self.context_lens[i] + self.query_lens[i], start)

    def working_set(self, i: int):
        """Sequence i's K/V working set (its pages in `kv_pool`), or None: derive from the cache."""
        return self.working_sets[i] if self.working_sets is not None else None
