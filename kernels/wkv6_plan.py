"""Chunk tables of the WKV6 prefill kernels: built ahead of a launch (`ChunkPlan`), so that a step
replayed from a CUDA graph needs nothing built or copied from the host, or for one launch of
packed sequences (`chunk_tables`). No Triton here: the PyTorch reference (`kernels.dispatch`) takes
a plan too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

BT = 64  # chunk of the prefill kernels: the state is materialised once per chunk


@dataclass(frozen=True)
class ChunkPlan:
    """The device tables the prefill kernels read, built ahead: for a step replayed from a CUDA graph
    (nothing is built or copied from the host inside it). One sequence of up to `rows` tokens whose
    length is `cu_seqlens[1]`, changeable before each launch (`ChunkPlan.set_length`); the kernels
    are launched for every chunk of `rows` tokens, and those past the length do nothing. Rows past
    the length join no sequence: their outputs are zero and they do not touch the state."""

    rows: int
    cu_seqlens: Tensor  # [2] int32: [0, length]
    chunk_offsets: Tensor  # [2] int32: [0, chunks of `rows`] (the scan reads entry 0 only)
    chunk_indices: Tensor  # [num_chunks, 2] int32: (0, i)

    @classmethod
    def one_sequence(cls, rows: int, device: torch.device | str) -> "ChunkPlan":
        n = -(-rows // BT)
        indices = torch.stack([torch.zeros(n, dtype=torch.int32), torch.arange(n, dtype=torch.int32)], 1)
        return cls(rows, torch.tensor([0, rows], dtype=torch.int32, device=device),
                   torch.tensor([0, n], dtype=torch.int32, device=device), indices.to(device))

    @property
    def num_chunks(self) -> int:
        return self.chunk_indices.shape[0]

    def set_length(self, length: int) -> None:
        """A queued fill on the device: no host copy, capturable and replay-safe."""
        if not 0 < length <= self.rows:
            raise ValueError(f"length: must be in [1, {self.rows}], got {length}")
        self.cu_seqlens[1:].fill_(length)


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """Through pinned memory, queued: a pageable copy would wait for every kernel queued before it
    (three per layer stalled a short prefill on the host)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def chunk_tables(lens: list[int], device: torch.device) -> tuple[Tensor, Tensor, int]:
    """The tables of B packed sequences of `lens` tokens, built on the host for one launch:
    chunk_offsets [B + 1] (each sequence's first chunk), chunk_indices [NT, 2] (sequence, chunk
    within it), and NT."""
    n_chunks = torch.tensor([(n + BT - 1) // BT for n in lens], dtype=torch.int64)
    chunk_offsets = torch.zeros(len(lens) + 1, dtype=torch.int64)
    torch.cumsum(n_chunks, 0, out=chunk_offsets[1:])
    NT = int(chunk_offsets[-1])
    seq = torch.repeat_interleave(torch.arange(len(lens)), n_chunks)
    within = torch.arange(NT) - chunk_offsets[:-1].repeat_interleave(n_chunks)
    chunk_indices = torch.stack([seq, within], 1).to(torch.int32)
    return to_device(chunk_offsets.to(torch.int32), device), to_device(chunk_indices, device), NT
