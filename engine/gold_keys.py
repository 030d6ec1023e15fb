"""Where each sequence's GOLD keys and values come from in one (eager) model step.

A sequence with a working set (`engine.kv_working_set`) whose pages hold every earlier position
derives only its new tokens (and reads the one before them for the token shift); one without,
or whose set is new or stale, derives its whole history from the compressed cache. Everything
derived for a sequence with a set is written to its pages, in one packed call per layer for all
such sequences. A decoding sequence with a set then attends through its page table (one paged
attention call for all of them); the others attend over contiguous keys with SDPA.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kernels.dispatch import gold_kv_derive
from kernels.gold_kv_derive_reference import GoldKVDeriveWeights

from . import layers as L
from .config import ModelConfig
from .host_copy import to_device


@dataclass
class History:
    """Proto-keys and token values of positions [start, ctx + q) of one sequence and its working
    set; or, for a sequence without a set in a step whose histories are too long to hold
    decompressed (`DECOMPRESSED_ROWS_LIMIT`), its compressed history, decompressed again in every
    layer, one history at a time."""

    proto_keys: Tensor | None
    token_values: Tensor | None
    start: int
    working_set: object | None = None
    compressed: tuple[Tensor, Tensor] | None = None


# Histories without a working set are decompressed once per step when their rows add up to at
# most this (8 KB a row at the 1.5B shape in bf16: 2 GiB); above it (sixteen 128K-token histories
# would hold 16 GiB), once per layer and sequence
DECOMPRESSED_ROWS_LIMIT = 1 << 18
# A history's keys are derived in pieces of at most this many rows: bounded activations, and the
# compiled functions' kernels stay below 2^31 elements (a 1M-token history in one piece made
# inductor compile a second, 64-bit-indexed variant inside the request: 1M prefill 138K -> 75K tok/s)
DERIVE_PIECE_ROWS = 1 << 17
# Up to this many packed rows, a step derives every GOLD layer's keys and values in one launch when
# the first layer asks (H100, 1.5B shape, 8 layers: 4,096 rows 1.53 -> 1.06 ms, 2,048 rows 0.79 ->
# 0.52, 16,384 rows 4.71 -> 4.46), holding them all for the step (64 KB a row: 1 GiB at the limit)
STACKED_DERIVE_ROWS = 1 << 14


class StepKeys:
    def __init__(self, config: ModelConfig, decompress, keys_view, context_lens: tuple[int, ...],
                 query_lens: tuple[int, ...], ops=None, stacked_weights: GoldKVDeriveWeights | None = None) -> None:
        """`ops`: a `layer_ops.LayerOps` whose functions are chosen by the rows they get (a decode
        step may derive a 100K-token history: that is a long prefill's work, compiled); None: the
        plain `layers` functions. `stacked_weights`: every GOLD layer's derivation weights stacked
        (`GoldFinchModel.gold_derive_weights`), to derive all layers in one launch."""
        self.config = config
        self._ops = ops
        self._stacked_weights = stacked_weights
        self._all_layers: tuple[Tensor, Tensor] | None = None  # [n_gold, N, C] keys and values
        self.pool = getattr(keys_view, "kv_pool", None)
        self.context_lens, self.query_lens = context_lens, query_lens
        # keys and values of the sequences with sets derived and stored by one kernel per layer
        # (`kernels.gold_kv_derive`); not with rotary, whose keys are stored rotated
        self._fused_derive = config.rope is None
        self._decompress = decompress
        self._hold_decompressed = sum(c + q for c, q in zip(context_lens, query_lens)) <= DECOMPRESSED_ROWS_LIMIT
        self.histories = [self._history(decompress, keys_view, i) for i in range(len(query_lens))]
        self.with_set = [i for i, h in enumerate(self.histories) if h.working_set is not None]
        if self.with_set:
            self._pack()

    def _history(self, decompress, view, i: int) -> History:
        ctx = self.context_lens[i]
        ws = view.working_set(i) if hasattr(view, "working_set") else None
        if ws is not None and ws.length == ctx and ctx > 0:
            return History(*decompress(*view.read_from(i, ctx - 1)), start=ctx - 1, working_set=ws)
        if ws is None and not self._hold_decompressed:
            return History(None, None, start=0, compressed=view.read(i))
        if ws is None:
            return History(*decompress(*view.read(i)), start=0)
        ws.length = 0  # stale or new: rebuilt from the compressed cache in this step
        return History(*decompress(*view.read(i)), start=0, working_set=ws)

    def _pack(self) -> None:
        """The rows of all sequences with sets as one batch: predecessor rows (zero before a
        history's first token), the rows to keep (a tail's first row only feeds the token shift),
        their pool slots and positions."""
        hs = [self.histories[i] for i in self.with_set]
        self.proto = torch.cat([h.proto_keys for h in hs])
        self.values_in = torch.cat([h.token_values for h in hs])
        # index arrays built in numpy and copied once each: a 64K-row history as Python lists cost
        # milliseconds of host time, and a copy per sequence one more queued copy each
        keep, slots, positions, zero_prev, row_slots, row = [], [], [], [], [], 0
        for h in hs:
            n = h.proto_keys.shape[0]
            first = 1 if h.start > 0 else 0
            if first == 0:
                zero_prev.append(row)
            keep.append(np.arange(row + first, row + n))
            positions.append(np.arange(h.start, h.start + n))
            slots.append(self.pool.flat_slot_array(h.working_set.pages, h.start + first, h.start + n))
            row_slots.append(np.full(first, -1, dtype=np.int64))  # a tail's first row: the shift only
            row_slots.append(slots[-1])
            row += n
        device = self.proto.device
        self.prev_proto, self.prev_values = L.shift_one(self.proto), L.shift_one(self.values_in)
        if zero_prev:  # index_fill_, not `[zp] = 0`: that copies the 0 from pageable memory, a sync
            zp = to_device(zero_prev, torch.long, device)
            self.prev_proto.index_fill_(0, zp, 0)
            self.prev_values.index_fill_(0, zp, 0)
        if self._fused_derive:  # every row's slot, -1 where not stored
            self.row_slots = to_device(np.concatenate(row_slots), torch.long, device)
        else:
            self.keep = to_device(np.concatenate(keep), torch.long, device)
            self.slots = to_device(np.concatenate(slots), torch.long, device)
            self.positions = to_device(np.concatenate(positions), torch.long, device)
        self.row_offsets = [0]
        for h in hs:
            self.row_offsets.append(self.row_offsets[-1] + h.proto_keys.shape[0])
        self._tables: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}

    # ---- one layer -----------------------------------------------------------------------------
    def _rotate(self, keys: Tensor, positions: Tensor) -> Tensor:
        cfg = self.config
        if cfg.rope is None:
            return keys
        return L.rotary(keys.view(keys.shape[0], cfg.n_head, -1), positions, cfg.rope.theta,
                        cfg.rope.rescale).reshape(keys.shape)

    def layer(self, j: int, w: L.LayerWeights, n_queries: list[int]) -> dict[int, tuple[Tensor, Tensor] | None]:
        """GOLD layer j's keys/values of the sequences with sets: contiguous [n_k, C] pairs, or
        None for one that attends through its pages (one query). Sequences without a set are
        derived one at a time by `derive`."""
        out: dict[int, tuple[Tensor, Tensor] | None] = {}
        if self.with_set:
            if self._fused_derive:
                keys, values = self._derived(j, w)
            else:
                keys, values = self._packed_keys_values(w)
                keys = self._rotate(keys, self.positions)
                self.pool.write(j, self.slots, keys[self.keep], values[self.keep])
            for n, i in enumerate(self.with_set):
                h = self.histories[i]
                if n_queries[i] == 1:
                    out[i] = None
                elif h.start == 0:
                    sl = slice(self.row_offsets[n], self.row_offsets[n + 1])
                    out[i] = keys[sl], values[sl]
                else:
                    out[i] = self.pool.gather(j, h.working_set.pages, self.context_lens[i] + self.query_lens[i])
        return out

    def _derived(self, j: int, w: L.LayerWeights) -> tuple[Tensor, Tensor]:
        """Layer j's keys and values of the packed rows by the derivation kernel, stored to the
        pages: all layers at once when the first asks (up to STACKED_DERIVE_ROWS rows), else this one."""
        inputs = (self.proto, self.prev_proto, self.values_in, self.prev_values)
        if self._stacked_weights is None or self.proto.shape[0] > STACKED_DERIVE_ROWS:
            return gold_kv_derive(*inputs, L.gold_kv_derive_weights(w), self.row_slots, *self.pool.flat_layer(j))
        if self._all_layers is None:
            self._all_layers = gold_kv_derive(*inputs, self._stacked_weights, self.row_slots,
                                              *self.pool.flat_all_layers())
        return self._all_layers[0][j], self._all_layers[1][j]

    def _packed_keys_values(self, w: L.LayerWeights) -> tuple[Tensor, Tensor]:
        """Keys and values of the packed rows of the sequences with sets (each given with its
        predecessor), in pieces of at most DERIVE_PIECE_ROWS (a rebuilt 1M-token set would
        otherwise make inductor compile a 64-bit-indexed variant inside the step)."""
        n = self.proto.shape[0]
        fn = self._for_rows(min(n, DERIVE_PIECE_ROWS)).gold_keys_values_rows
        if n <= DERIVE_PIECE_ROWS:
            return fn(self.proto, self.prev_proto, self.values_in, self.prev_values, w)
        pieces = [fn(self.proto[a:a + DERIVE_PIECE_ROWS], self.prev_proto[a:a + DERIVE_PIECE_ROWS],
                     self.values_in[a:a + DERIVE_PIECE_ROWS], self.prev_values[a:a + DERIVE_PIECE_ROWS], w)
                  for a in range(0, n, DERIVE_PIECE_ROWS)]
        return torch.cat([k for k, _ in pieces]), torch.cat([v for _, v in pieces])

    def derive(self, i: int, w: L.LayerWeights) -> tuple[Tensor, Tensor]:
        """Keys and values of sequence i's whole history (it has no working set) for one layer, in
        pieces of at most DERIVE_PIECE_ROWS (each piece's first row is derived again from the row
        before it, with that row's own result discarded: every row depends on its predecessor only)."""
        h = self.histories[i]
        n = h.proto_keys.shape[0] if h.compressed is None else h.compressed[0].shape[0]
        if n <= DERIVE_PIECE_ROWS and h.compressed is None:
            keys, values = self._for_rows(n).gold_keys_values(h.proto_keys, h.token_values, w)
        else:
            keys = values = None
            for a in range(0, n, DERIVE_PIECE_ROWS):
                lo, hi = max(a - 1, 0), min(n, a + DERIVE_PIECE_ROWS)
                proto, token_values = self._history_rows(h, lo, hi)
                k, v = self._for_rows(hi - lo).gold_keys_values(proto, token_values, w)
                if keys is None:
                    keys, values = k.new_empty(n, k.shape[1]), v.new_empty(n, v.shape[1])
                keys[a:hi], values[a:hi] = k[a - lo:], v[a - lo:]
        return self._rotate(keys, torch.arange(keys.shape[0], device=keys.device)), values

    def _history_rows(self, h: History, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        if h.compressed is None:
            return h.proto_keys[lo:hi], h.token_values[lo:hi]
        compressed, token_ids = h.compressed
        return self._decompress(compressed[lo:hi], token_ids[lo:hi])

    def _for_rows(self, n: int):
        return L if self._ops is None else self._ops.for_derived_rows(n)

    def page_tables(self, seqs: list[int]) -> tuple[Tensor, Tensor]:
        """int32 page tables [n, P] and key counts [n] of sequences that attend through pages
        (built once per step: every layer reads the same)."""
        memo = self._tables.get(tuple(seqs))
        if memo is not None:
            return memo
        pages = [self.histories[i].working_set.pages for i in seqs]
        width = max(len(p) for p in pages)
        device = self.proto.device
        tables = to_device([p + [0] * (width - len(p)) for p in pages], torch.int32, device)
        lens = to_device([self.context_lens[i] + self.query_lens[i] for i in seqs], torch.int32, device)
        self._tables[tuple(seqs)] = tables, lens
        return tables, lens

    def finish(self) -> None:
        """Marks every set as holding the whole history after the step."""
        for i in self.with_set:
            self.histories[i].working_set.length = self.context_lens[i] + self.query_lens[i]
