"""The GOLD layers of one model step (`GoldFinchModel` inherits them): only the positions that the
last logit and the carried token-shift states depend on (`ModelConfig.gold_tail_len` at the first
GOLD layer, two fewer at each next one), each query attending over its sequence's whole history
(end-aligned causal), with keys and values from `engine.gold_keys.StepKeys`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.dispatch import paged_attention, tail_attention

from . import layers as L
from .gold_keys import StepKeys
from .state import KeyCacheView, RNNStatePool
from .step_batch import StepBatch
from .token_shift import Windows as _Windows, select_with_prev as _select_with_prev


class SequenceSubset:
    """A step's key-cache view restricted to some of its sequences (those running the GOLD layers),
    renumbered 0.. in order."""

    def __init__(self, view: KeyCacheView, keep: list[int]) -> None:
        self.view, self.keep = view, keep
        self.kv_pool = getattr(view, "kv_pool", None)

    def read(self, i: int):
        return self.view.read(self.keep[i])

    def read_from(self, i: int, start: int):
        return self.view.read_from(self.keep[i], start)

    def working_set(self, i: int):
        get = getattr(self.view, "working_set", None)
        return get(self.keep[i]) if get is not None else None


@dataclass
class GoldWorkCounter:
    """Rows the GOLD layers computed (queries) and keys they attended over, for cost tests."""

    query_rows: int = 0
    key_rows: int = 0


class GoldLayers:
    """Methods of `GoldFinchModel` (config, blocks, ops, the step's index cache `_idx` and layer
    functions `_ops`, `gold_work`)."""

    def _gold_layers(self, x: Tensor, batch: StepBatch, rnn: RNNStatePool, keys: KeyCacheView) -> Tensor:
        cfg = self.config
        win = _Windows(starts=[0] * len(batch.query_lens), lens=list(batch.query_lens))
        keep = None if batch.needs_logits is None else [i for i, n in enumerate(batch.needs_logits) if n]
        full = batch
        if keep is not None and len(keep) < len(batch.query_lens):
            if not keep:
                return self._no_logits(len(batch.query_lens))
            x, batch, keys = self._gold_subset(x, batch, keys, keep)
            win = _Windows(starts=[0] * len(keep), lens=list(batch.query_lens))
        x, win = self._gold_input_window(x, win, batch.all_logits)
        step_keys = StepKeys(cfg, self.decompress, keys, batch.context_lens, batch.query_lens, self.ops,
                             self.gold_derive_weights)
        for j, layer in enumerate(range(cfg.gold_start, cfg.n_layer)):
            x, win = self._gold_block(layer, j, x, win, batch, rnn, step_keys)
        step_keys.finish()
        x = F.layer_norm(x, (x.shape[-1],), *self.ln_out)
        logits = F.linear(x, self.head)
        if batch is not full:  # rows of the sequences that skipped: NaN, never sampled
            out = self._no_logits(len(full.query_lens))
            out[self._idx.get(("keep", tuple(keep)), lambda: keep)] = logits
            return out
        return logits

    def _no_logits(self, n: int) -> Tensor:
        return torch.full((n, self.config.vocab_size), float("nan"), dtype=self.dtype, device=self.device)

    def _gold_subset(self, x: Tensor, batch: StepBatch, keys: KeyCacheView, keep: list[int]):
        """The rows, batch and key-cache view of the sequences in `keep` only."""
        starts = [0]
        for n in batch.query_lens:
            starts.append(starts[-1] + n)
        rows = self._idx.get(("keep_rows", tuple(keep), batch.query_lens),
                             lambda: [t for i in keep for t in range(starts[i], starts[i + 1])])
        sub = StepBatch(token_ids=batch.token_ids[rows], query_lens=tuple(batch.query_lens[i] for i in keep),
                        context_lens=tuple(batch.context_lens[i] for i in keep),
                        state_slots=batch.state_slots[self._idx.get(("keep", tuple(keep)), lambda: keep)])
        return x[rows], sub, SequenceSubset(keys, keep)

    # ---- GOLD layers over the tail ------------------------------------------------------------
    def _window_start(self, j: int, T: int, all_logits: bool) -> int:
        """First position GOLD layer j (0-based among GOLD layers) outputs."""
        return 0 if all_logits else max(0, T - 1 - 2 * (self.config.n_gold - 1 - j))

    def _gold_input_window(self, x: Tensor, win: _Windows, all_logits: bool) -> tuple[Tensor, _Windows]:
        starts = [max(0, self._window_start(0, T, all_logits) - 2) for T in win.lens]
        rows, base = [], 0
        for s, T in zip(starts, win.lens):
            rows.extend(range(base + s, base + T))
            base += T
        return x[self._idx.get(("gold_in", tuple(starts), tuple(win.lens)), lambda: rows)], _Windows(starts, list(win.lens))

    def _gold_block(self, layer: int, j: int, x: Tensor, win: _Windows, batch: StepBatch,
                    rnn: RNNStatePool, step_keys: StepKeys) -> tuple[Tensor, _Windows]:
        w, slots = self.blocks[layer], batch.state_slots
        out_starts = [self._window_start(j, T, batch.all_logits) for T in win.lens]
        q_starts = [max(0, s - 1) if not batch.all_logits else 0 for s in out_starts]
        xa = L.layer_norm(x, w, "ln1")
        cur, prev, last = _select_with_prev(xa, win, q_starts, rnn.tmix_shift[layer, slots], self._idx)
        rnn.tmix_shift[layer, slots] = last
        q_win = _Windows(q_starts, win.lens)
        x_mid, _, _ = _select_with_prev(x, win, q_starts, torch.zeros_like(x[: len(win.lens)]), self._idx)
        x_mid = x_mid + self._gold_attention(j, w, self._ops.gold_query(cur, prev, w), q_win, batch, step_keys)
        xb = L.layer_norm(x_mid, w, "ln2")
        cur, prev, last = _select_with_prev(xb, q_win, out_starts, rnn.cmix_shift[layer, slots], self._idx)
        rnn.cmix_shift[layer, slots] = last
        x_out, _, _ = _select_with_prev(x_mid, q_win, out_starts, torch.zeros_like(x[: len(win.lens)]), self._idx)
        return x_out + self._ops.channel_mix(cur, prev, w), _Windows(out_starts, win.lens)

    def _gold_attention(self, j: int, w: L.LayerWeights, q: Tensor, q_win: _Windows, batch: StepBatch,
                        step_keys: StepKeys) -> Tensor:
        """Each query row attends over its sequence's whole history, end-aligned causal: decoding
        sequences with a working set in one paged call, the others one SDPA each."""
        cfg = self.config
        H, D = cfg.n_head, cfg.head_size
        n_queries = [T - s for s, T in zip(q_win.starts, q_win.lens)]
        kv = step_keys.layer(j, w, n_queries)
        q_pos = self._idx.get(("q_pos", tuple(q_win.starts), tuple(q_win.lens), batch.context_lens), lambda: [
            p for s, T, ctx in zip(q_win.starts, q_win.lens, batch.context_lens) for p in range(ctx + s, ctx + T)])
        q = q.view(-1, H, D)
        if cfg.rope is not None:
            q = L.rotary(q, q_pos, cfg.rope.theta, cfg.rope.rescale)
        out = torch.empty_like(q)
        bases = [0]
        for n in n_queries:
            bases.append(bases[-1] + n)
        paged = [i for i in range(len(n_queries)) if i in kv and kv[i] is None]
        if paged:
            rows = self._idx.get(("paged_rows", tuple(bases), tuple(paged)), lambda: [bases[i] for i in paged])
            tables, lens = step_keys.page_tables(paged)
            k_pages, v_pages = step_keys.pool.layer(j, H)
            out[rows] = paged_attention(q[rows], k_pages, v_pages, tables, lens)
            self.gold_work.query_rows += len(paged)
            self.gold_work.key_rows += int(sum(batch.context_lens[i] + batch.query_lens[i] for i in paged))
        for i, n_q in enumerate(n_queries):
            if i in kv and kv[i] is None:
                continue
            keys, values = kv[i] if i in kv else step_keys.derive(i, w)
            n_k = keys.shape[0]
            rows = slice(bases[i], bases[i] + n_q)
            out[rows] = tail_attention(q[rows], keys.view(n_k, H, D), values.view(n_k, H, D), q_pos[rows])
            self.gold_work.query_rows += n_q
            self.gold_work.key_rows += n_q * n_k
        out = L.layer_norm(out.view(-1, H * D), w, "att.ln_x")
        return L.linear(out, w, "att.output")
