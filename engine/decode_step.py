"""The decode step with static shapes: one new token for each of B sequences whose K/V working sets
hold their whole history. Every index arrives as a tensor and nothing reads a tensor back to the
host, so `engine.cuda_graphs` can capture it once per batch size and replay it.

Per step and sequence it derives the new token's keys and values of every GOLD layer (from its
compressed key and the one before it), writes them to the working-set pages, and attends through
the page tables with one paged attention call per layer. The same arithmetic as
`GoldFinchModel.step` on a decode batch (tested token for token against it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.dispatch import paged_attention, wkv_decode

from . import layers as L
from .kv_pool import PagedKeyCache
from .kv_working_set import PagedKVPool
from .state import RNNStatePool


@dataclass(frozen=True)
class DecodeInputs:
    """Tensors of one decode step, B rows (padded rows point at scratch and have seq_lens 0)."""

    token_ids: Tensor  # [B] long
    state_slots: Tensor  # [B] long: RNN state slot
    positions: Tensor  # [B] long: the new token's position (tokens cached before it)
    key_slots: Tensor  # [B] long: flat slot of the new token in the compressed-key pool
    prev_key_slots: Tensor  # [B] long: flat slot of the token before it
    kv_slots: Tensor  # [B] long: flat row of the new token in the working-set pool
    kv_page_tables: Tensor  # [B, P] int32
    seq_lens: Tensor  # [B] int32: keys each query attends to (positions + 1)


class DecodeStep:
    """Binds a model to the pools it decodes over; `__call__` is the capturable step."""

    def __init__(self, model, rnn: RNNStatePool, key_cache: PagedKeyCache, kv_pool: PagedKVPool) -> None:
        self.model, self.rnn, self.key_cache, self.kv_pool = model, rnn, key_cache, kv_pool

    @torch.inference_mode()
    def __call__(self, inp: DecodeInputs, num_splits: int | None = None) -> Tensor:
        """Logits [B, V] in the model dtype; updates states, compressed keys and working sets."""
        m, cfg = self.model, self.model.config
        x = m.embed(inp.token_ids)
        for layer in range(cfg.n_finch):
            x = self._finch_block(layer, x, inp)
        compressed = F.linear(x, m.w_compress)
        self.key_cache.write(inp.key_slots, compressed, inp.token_ids)
        self._store_new_keys_values(compressed, inp)
        for j, layer in enumerate(range(cfg.gold_start, cfg.n_layer)):
            x = self._gold_block(layer, j, x, inp, num_splits)
        x = F.layer_norm(x, (x.shape[-1],), *m.ln_out)
        return F.linear(x, m.head)

    def _finch_block(self, layer: int, x: Tensor, inp: DecodeInputs) -> Tensor:
        m, cfg = self.model, self.model.config
        w, rnn, slots, H, N = m.blocks[layer], self.rnn, inp.state_slots, cfg.n_head, cfg.head_size
        tmix, cmix = rnn.tmix_shift[layer], rnn.cmix_shift[layer]
        # a token shift reads the carried row before the block and stores the new one after
        xa, r, k, v, log_decay, u, extra = m.ops.finch_tmix_in(x, tmix.index_select(0, slots), w, cfg)
        tmix.index_copy_(0, slots, xa)
        heads = lambda t: t.view(t.shape[0], H, N)  # noqa: E731
        y = wkv_decode(heads(r), heads(k), heads(v), heads(log_decay), u, rnn.wkv[layer], slots)
        x, xf = m.ops.finch_tmix_out(x, y.view(r.shape), extra, w, cfg)
        x = m.ops.channel_mix_residual(x, xf, cmix.index_select(0, slots), w)
        cmix.index_copy_(0, slots, xf)
        return x

    def _store_new_keys_values(self, compressed: Tensor, inp: DecodeInputs) -> None:
        """Every GOLD layer's key and value of the new tokens, into the working-set pages."""
        m, cfg = self.model, self.model.config
        flat_keys, flat_ids = self.key_cache.compressed_keys.view(-1, cfg.compressed_dim), self.key_cache.token_ids.view(-1)
        prev_c = flat_keys.index_select(0, inp.prev_key_slots)
        prev_ids = flat_ids.index_select(0, inp.prev_key_slots)
        # both rows through one matmul, as the eager path derives a tail [ctx - 1, ctx] together
        proto, token_values = m.decompress(torch.cat([prev_c, compressed.to(prev_c.dtype)]),
                                           torch.cat([prev_ids.long(), inp.token_ids]))
        B = inp.token_ids.shape[0]
        for j, layer in enumerate(range(cfg.gold_start, cfg.n_layer)):
            keys, values = m.ops.gold_keys_values_rows(proto[B:], proto[:B], token_values[B:], token_values[:B],
                                                   m.blocks[layer])
            if cfg.rope is not None:
                keys = L.rotary(keys.view(B, cfg.n_head, -1), inp.positions, cfg.rope.theta,
                                cfg.rope.rescale).reshape(keys.shape)
            self.kv_pool.write(j, inp.kv_slots, keys, values)

    def _gold_block(self, layer: int, j: int, x: Tensor, inp: DecodeInputs, num_splits: int | None) -> Tensor:
        m, cfg = self.model, self.model.config
        w, rnn, slots, H, D = m.blocks[layer], self.rnn, inp.state_slots, cfg.n_head, cfg.head_size
        tmix, cmix = rnn.tmix_shift[layer], rnn.cmix_shift[layer]
        xa, q = m.ops.gold_query_in(x, tmix.index_select(0, slots), w)
        tmix.index_copy_(0, slots, xa)
        q = q.view(-1, H, D)
        if cfg.rope is not None:
            q = L.rotary(q, inp.positions, cfg.rope.theta, cfg.rope.rescale)
        k_pages, v_pages = self.kv_pool.layer(j, H)
        o = paged_attention(q, k_pages, v_pages, inp.kv_page_tables, inp.seq_lens, num_splits=num_splits)
        x, xb = m.ops.gold_attention_out(x, o.reshape(x.shape[0], -1), w)
        x = m.ops.channel_mix_residual(x, xb, cmix.index_select(0, slots), w)
        cmix.index_copy_(0, slots, xb)
        return x
