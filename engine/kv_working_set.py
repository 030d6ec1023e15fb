"""Materialised per-layer keys and values of running sequences: the fast decode cache mode.

The compressed cache (260 B/token at the 1.5B shape) stays the one persistent store. For a sequence
that is decoding, re-deriving every GOLD layer's keys and values for its whole history at each step
costs ~94 MFLOP per cached token; keeping them (8 layers x 2 x n_embd values, 64 KB/token at the
1.5B shape) turns a step's derivation into the new tokens' only. A working set is derived data: it
can be dropped at any time (preemption, memory pressure, a session handing the state on) and is
rebuilt from the compressed cache when the sequence runs again.
"""
from __future__ import annotations

import torch
from torch import Tensor


class KVWorkingSet:
    """keys/values [n_gold, capacity, C] (keys already rotated when the model uses rotary);
    `length` positions [0, length) are valid."""

    def __init__(self, n_gold: int, width: int, dtype: torch.dtype, device: torch.device, capacity: int) -> None:
        self.keys = torch.empty(n_gold, capacity, width, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def reserve(self, n: int) -> None:
        """Room for n positions (doubling, so growth is amortised)."""
        if n <= self.capacity:
            return
        cap = max(n, 2 * self.capacity)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = torch.empty(old.shape[0], cap, old.shape[2], dtype=old.dtype, device=old.device)
            new[:, : self.length] = old[:, : self.length]
            setattr(self, name, new)

    def store(self, layer: int, start: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Writes rows [start, start + n) of one layer; returns that layer's [0, start + n)."""
        end = start + keys.shape[0]
        self.keys[layer, start:end] = keys
        self.values[layer, start:end] = values
        return self.keys[layer, :end], self.values[layer, :end]


class WorkingSetManager:
    """Gives running sequences working sets while a byte budget allows; the rest derive per step."""

    def __init__(self, n_gold: int, width: int, dtype: torch.dtype, device: torch.device, budget_bytes: int,
                 min_capacity: int = 256) -> None:
        self.n_gold, self.width, self.dtype, self.device = n_gold, width, dtype, device
        self.budget_bytes = budget_bytes
        self.min_capacity = min_capacity
        self._sets: dict[object, KVWorkingSet] = {}
        self.num_created = 0
        self.num_dropped_over_budget = 0
        self.bytes_per_token = 2 * n_gold * width * torch.tensor([], dtype=dtype).element_size()

    def used_bytes(self) -> int:
        return sum(ws.nbytes() for ws in self._sets.values())

    def __len__(self) -> int:
        return len(self._sets)

    def for_step(self, owners: list, needed: list[int]) -> list[KVWorkingSet | None]:
        """Working sets for one step's sequences (needed[i] = positions after the step); drops those
        of sequences no longer on the device first."""
        for owner in [o for o in self._sets if getattr(o, "state_slot", None) is None]:
            del self._sets[owner]
        out = []
        for owner, n in zip(owners, needed):
            ws = self._sets.get(owner)
            if ws is None:
                cap = max(n, self.min_capacity)
                if self.used_bytes() + cap * self.bytes_per_token > self.budget_bytes:
                    out.append(None)
                    continue
                ws = self._sets[owner] = KVWorkingSet(self.n_gold, self.width, self.dtype, self.device, cap)
                self.num_created += 1
            elif n > ws.capacity:
                extra = (max(n, 2 * ws.capacity) - ws.capacity) * self.bytes_per_token
                if self.used_bytes() + extra > self.budget_bytes:
                    del self._sets[owner]  # over budget: this sequence goes back to deriving per step
                    self.num_dropped_over_budget += 1
                    out.append(None)
                    continue
            ws.reserve(n)
            out.append(ws)
        return out

    def drop(self, owner) -> None:
        self._sets.pop(owner, None)
