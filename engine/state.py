"""Where a sequence's inference state lives: RNN state slots and the compressed key cache.

The persistent state of a sequence is exactly what the GoldFinch paper says it is:
- per Finch layer, the WKV state [H, K, V] (float32) and two token-shift vectors;
- per GOLD layer, two token-shift vectors;
- per cached token, its compressed key (`compressed_dim` values) and its token id.
Decompressed keys and per-layer keys/values are derived from these when needed; a decoding
sequence may keep its per-layer keys/values as a working set (`engine.kv_working_set`), derived
data that is dropped whenever memory is wanted and never saved.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .config import ModelConfig

TOKEN_ID_DTYPE = torch.int32


class KeyCacheView(Protocol):
    """The compressed key cache of the sequences of one model step, in batch order."""

    def write(self, compressed_keys: Tensor, token_ids: Tensor) -> None:
        """Stores this step's new tokens (packed in batch order, [N, Cc] and [N]) after each
        sequence's existing entries."""

    def read(self, i: int) -> tuple[Tensor, Tensor]:
        """Sequence i's whole history including this step's tokens: ([L, Cc], [L])."""


@dataclass
class RNNStatePool:
    """Preallocated per-layer RNN states indexed by slot; a sequence owns one slot while running.

    wkv: [n_finch, S, H, K, V] float32; tmix_shift / cmix_shift: [n_layer, S, C] in the model dtype
    (the reference keeps token-shift states in the activation dtype)."""

    wkv: Tensor
    tmix_shift: Tensor
    cmix_shift: Tensor

    @classmethod
    def allocate(cls, config: ModelConfig, num_slots: int, dtype: torch.dtype,
                 device: str | torch.device = "cpu") -> "RNNStatePool":
        H, N, C = config.n_head, config.head_size, config.n_embd
        return cls(
            wkv=torch.zeros(config.n_finch, num_slots, H, N, N, dtype=torch.float32, device=device),
            tmix_shift=torch.zeros(config.n_layer, num_slots, C, dtype=dtype, device=device),
            cmix_shift=torch.zeros(config.n_layer, num_slots, C, dtype=dtype, device=device),
        )

    @property
    def num_slots(self) -> int:
        return self.wkv.shape[1]

    def bytes_per_slot(self) -> int:
        return sum(t[:, 0].numel() * t.element_size() for t in (self.wkv, self.tmix_shift, self.cmix_shift))

    def reset(self, slot: int) -> None:
        for t in (self.wkv, self.tmix_shift, self.cmix_shift):
            t[:, slot].zero_()

    def copy_slot(self, src: int, dst: int) -> None:
        for t in (self.wkv, self.tmix_shift, self.cmix_shift):
            t[:, dst].copy_(t[:, src])

    def save(self, slot: int, device: str | torch.device = "cpu") -> dict[str, Tensor]:
        """A copy of one slot's state (e.g. to host memory for preemption or a session)."""
        return {name: getattr(self, name)[:, slot].to(device, copy=True)
                for name in ("wkv", "tmix_shift", "cmix_shift")}

    def load(self, slot: int, saved: dict[str, Tensor]) -> None:
        for name in ("wkv", "tmix_shift", "cmix_shift"):
            target = getattr(self, name)[:, slot]
            if saved[name].shape != target.shape:
                raise ValueError(f"{name}: saved state has shape {tuple(saved[name].shape)}, "
                                 f"slot expects {tuple(target.shape)}")
            target.copy_(saved[name])


class ContiguousKeyCache:
    """A plain (unpaged) compressed key cache: one growable tensor pair per sequence.

    Used by the in-process reference path and tests; the engine uses the paged pool."""

    def __init__(self, config: ModelConfig, batch_size: int, dtype: torch.dtype,
                 device: str | torch.device = "cpu") -> None:
        self.compressed_keys = [torch.zeros(0, config.compressed_dim, dtype=dtype, device=device)
                                for _ in range(batch_size)]
        self.token_ids = [torch.zeros(0, dtype=TOKEN_ID_DTYPE, device=device) for _ in range(batch_size)]
        self._pending_lens: list[int] | None = None

    def set_step_lens(self, query_lens: list[int]) -> None:
        """How many new tokens each sequence brings in the coming step."""
        if len(query_lens) != len(self.compressed_keys):
            raise ValueError(f"query_lens: {len(query_lens)} lengths for {len(self.compressed_keys)} sequences")
        self._pending_lens = list(query_lens)

    def write(self, compressed_keys: Tensor, token_ids: Tensor) -> None:
        if self._pending_lens is None:
            raise RuntimeError("set_step_lens must be called before a step")
        offset = 0
        for i, n in enumerate(self._pending_lens):
            chunk = slice(offset, offset + n)
            self.compressed_keys[i] = torch.cat([self.compressed_keys[i], compressed_keys[chunk]])
            self.token_ids[i] = torch.cat([self.token_ids[i], token_ids[chunk].to(TOKEN_ID_DTYPE)])
            offset += n
        self._pending_lens = None

    def read(self, i: int) -> tuple[Tensor, Tensor]:
        return self.compressed_keys[i], self.token_ids[i]

    def length(self, i: int) -> int:
        return self.token_ids[i].shape[0]

    def persistent_bytes(self, i: int) -> int:
        return sum(t.numel() * t.element_size() for t in (self.compressed_keys[i], self.token_ids[i]))
