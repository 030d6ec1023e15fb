"""The decode step with static shapes: one new token for each of B sequences whose K/V working sets
hold their whole history. Every index arrives as a tensor and nothing reads a tensor back to the
host, so `engine.cuda_graphs` can capture it once per batch size and replay it.

Per step and sequence it derives the new token's keys and values of every GOLD layer (from its
compressed key and the one before it), writes them to the working-set pages, and attends through
the page tables with one paged attention call per layer. The same arithmetic as
`GoldFinchModel.step` on a decode batch (tested token for token against it).

A small batch is bound by its kernel count, so the step batches across layers where it can: every
GOLD layer's new keys and values in one computation and one write, every layer's token-shift rows
gathered once at the start and written once at the end, and each block's projections that read
same-shaped inputs as one stacked product (`engine.decode_ops`). On CUDA, up to
`decode_ops.SMALL_BATCH` sequences of a Finch-C2 model, each block runs fused in 9-11 kernels
(`engine.decode_fused`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.dispatch import greedy_counters, greedy_sample, paged_attention, use_triton, wkv_decode

from . import layers as L
from .config import TMIX_FINCH
from .decode_fused import FusedBlocks, supported as fused_supported
from .decode_ops import DecayValue2Lora, GoldKVWeights
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
    seq_lens: Tensor  # [B] int64 (or int32): keys each query attends to (positions + 1)


@dataclass(frozen=True)
class DecodeOutput:
    """A decode step's logits [B, V] (model dtype) and each row's greedy choice made in the step:
    the argmax over the sampleable ids [B] int64 and its raw log-prob [B] float32 (what
    `engine.sampler.Sampler` gives a greedy row without bias, penalties or masks)."""

    logits: Tensor
    greedy_ids: Tensor
    greedy_logprobs: Tensor

    def rows(self, n: int) -> "DecodeOutput":
        return DecodeOutput(self.logits[:n], self.greedy_ids[:n], self.greedy_logprobs[:n])


class TokenShiftRows:
    """Every layer's carried token-shift rows of a step's batch, gathered once when the step starts;
    the blocks' new rows are collected in layer order and written back once when it ends. Exact: a
    block reads only its own layer's carried row."""

    def __init__(self, rnn: RNNStatePool, slots: Tensor) -> None:
        self.tmix_prev = rnn.tmix_shift.index_select(1, slots)  # [n_layer, B, C]
        self.cmix_prev = rnn.cmix_shift.index_select(1, slots)
        self.tmix_new: list[Tensor] = []
        self.cmix_new: list[Tensor] = []

    def write_back(self, rnn: RNNStatePool, slots: Tensor) -> None:
        if not len(self.tmix_new) == len(self.cmix_new) == rnn.tmix_shift.shape[0]:
            raise RuntimeError(f"token shift: {len(self.tmix_new)}/{len(self.cmix_new)} new rows "
                               f"for {rnn.tmix_shift.shape[0]} layers")
        rnn.tmix_shift.index_copy_(1, slots, torch.stack(self.tmix_new))
        rnn.cmix_shift.index_copy_(1, slots, torch.stack(self.cmix_new))


class DecodeStep:
    """Binds a model to the pools it decodes over; `__call__` is the capturable step."""

    def __init__(self, model, rnn: RNNStatePool, key_cache: PagedKeyCache, kv_pool: PagedKVPool,
                 fused: bool | None = None, sampleable_vocab: int | None = None, max_rows: int = 512) -> None:
        """`fused`: small batches run the blocks of `engine.decode_fused` (Finch-C2 models); by
        default where the Triton kernels run (on the CPU the fused blocks would run the kernels'
        references, ~10% slower than the unfused blocks for the demo model: tests only).
        `sampleable_vocab`: ids below it may be chosen by `with_greedy` (None: all); `max_rows`: the
        largest batch it runs (its greedy choice's counters)."""
        self.model, self.rnn, self.key_cache, self.kv_pool = model, rnn, key_cache, kv_pool
        cfg = model.config
        self.sampleable_vocab = cfg.vocab_size if sampleable_vocab is None else sampleable_vocab
        if not 1 <= self.sampleable_vocab <= cfg.vocab_size:
            raise ValueError(f"sampleable_vocab: {sampleable_vocab} not in [1, {cfg.vocab_size}]")
        # made here, not in a captured graph: graphs share a memory pool, the counters must persist
        self.greedy_counters = greedy_counters(model.device, max_rows)
        use_fused = use_triton(model.emb) if fused is None else fused
        self.fused = FusedBlocks(model) if use_fused and fused_supported(cfg) else None
        self.gold_kv_weights = GoldKVWeights.stack([model.blocks[i] for i in range(cfg.gold_start, cfg.n_layer)])
        merge = cfg.tmix != TMIX_FINCH and cfg.use_v2
        self.decay_value2_loras = [DecayValue2Lora.merge(model.blocks[i]) if merge else None
                                   for i in range(cfg.n_finch)]

    @torch.inference_mode()
    def __call__(self, inp: DecodeInputs, num_splits: int | None = None) -> Tensor:
        """Logits [B, V] in the model dtype; updates states, compressed keys and working sets."""
        m, cfg = self.model, self.model.config
        shifts = TokenShiftRows(self.rnn, inp.state_slots)
        # a small batch runs the fused blocks (a static choice: the batch size is the graph's)
        fused = self.fused if self.fused is not None and self.fused.applies(inp.token_ids.shape[0]) else None
        x = fused.embed(inp.token_ids) if fused is not None else m.embed(inp.token_ids)
        for layer in range(cfg.n_finch):
            x = self._finch_block(layer, x, inp, shifts, fused)
        compressed = F.linear(x, m.w_compress)
        self.key_cache.write(inp.key_slots, compressed, inp.token_ids)
        self._store_new_keys_values(compressed, inp)
        for j, layer in enumerate(range(cfg.gold_start, cfg.n_layer)):
            x = self._gold_block(layer, j, x, inp, shifts, num_splits, fused)
        shifts.write_back(self.rnn, inp.state_slots)
        if fused is not None:
            return fused.logits(x)
        x = F.layer_norm(x, (x.shape[-1],), *m.ln_out)
        return F.linear(x, m.head)

    def with_greedy(self, inp: DecodeInputs) -> DecodeOutput:
        """The step, and each row's greedy token and its raw log-prob computed on the device (in the
        CUDA graph): a greedy batch then needs no sampler launches after the step."""
        logits = self(inp)
        ids, logprobs = greedy_sample(logits, self.sampleable_vocab, self.greedy_counters)
        return DecodeOutput(logits, ids, logprobs)

    def _finch_block(self, layer: int, x: Tensor, inp: DecodeInputs, shifts: TokenShiftRows,
                     fused: FusedBlocks | None) -> Tensor:
        m, cfg = self.model, self.model.config
        w, rnn, slots, H, N = m.blocks[layer], self.rnn, inp.state_slots, cfg.n_head, cfg.head_size
        if fused is not None:
            x, xa, xf = fused.finch_block(layer, x, shifts.tmix_prev[layer], shifts.cmix_prev[layer], rnn.wkv[layer],
                                          slots)
            shifts.tmix_new.append(xa)
            shifts.cmix_new.append(xf)
            return x
        xa, r, k, v, log_decay, u, extra = m.ops.finch_tmix_in_stacked(x, shifts.tmix_prev[layer], w,
                                                                       self.decay_value2_loras[layer], cfg)
        shifts.tmix_new.append(xa)
        heads = lambda t: t.view(t.shape[0], H, N)  # noqa: E731  (rows may be strided, channels are not)
        y = wkv_decode(heads(r), heads(k), heads(v), heads(log_decay), u, rnn.wkv[layer], slots)
        x, xf = m.ops.finch_tmix_out(x, y.view(r.shape), extra, w, cfg)
        shifts.cmix_new.append(xf)
        return m.ops.channel_mix_residual_stacked(x, xf, shifts.cmix_prev[layer], w, cfg)

    def _store_new_keys_values(self, compressed: Tensor, inp: DecodeInputs) -> None:
        """Every GOLD layer's key and value of the new tokens, into the working-set pages: one
        computation and one write for all layers (their inputs are the same, only weights differ)."""
        m, cfg = self.model, self.model.config
        flat_keys, flat_ids = self.key_cache.compressed_keys.view(-1, cfg.compressed_dim), self.key_cache.token_ids.view(-1)
        # both rows through one matmul, as the eager path derives a tail [ctx - 1, ctx] together
        proto, token_values = m.ops.decode_decompress_rows(flat_keys, flat_ids, inp.prev_key_slots, compressed,
                                                           inp.token_ids, m.emb, *m.ln0, m.w_decompress)
        B = inp.token_ids.shape[0]
        keys, values = m.ops.gold_keys_values_rows_all_layers(proto[B:], proto[:B], token_values[B:], token_values[:B],
                                                              self.gold_kv_weights)  # [n_gold, B, C] each
        if cfg.rope is not None:
            n_gold = keys.shape[0]
            keys = L.rotary(keys.view(n_gold, B, cfg.n_head, -1), inp.positions, cfg.rope.theta,
                            cfg.rope.rescale).reshape(n_gold, B, -1)
        self.kv_pool.write_all_layers(inp.kv_slots, keys, values)

    def _gold_block(self, layer: int, j: int, x: Tensor, inp: DecodeInputs, shifts: TokenShiftRows,
                    num_splits: int | None, fused: FusedBlocks | None) -> Tensor:
        m, cfg = self.model, self.model.config
        w, H, D = m.blocks[layer], cfg.n_head, cfg.head_size
        if fused is not None:
            xa, q = fused.gold_query(j, layer, x, shifts.tmix_prev[layer])
        else:
            xa, q = m.ops.gold_query_in(x, shifts.tmix_prev[layer], w)
        shifts.tmix_new.append(xa)
        q = q.view(-1, H, D)
        if cfg.rope is not None:
            q = L.rotary(q, inp.positions, cfg.rope.theta, cfg.rope.rescale)
        k_pages, v_pages = self.kv_pool.layer(j, H)
        o = paged_attention(q, k_pages, v_pages, inp.kv_page_tables, inp.seq_lens, num_splits=num_splits)
        if fused is not None:
            x, xb = fused.channel_mix(layer, fused.gold_back(layer, x, o.reshape(x.shape[0], -1)),
                                      shifts.cmix_prev[layer])
            shifts.cmix_new.append(xb)
            return x
        x, xb = m.ops.gold_attention_out(x, o.reshape(x.shape[0], -1), w)
        shifts.cmix_new.append(xb)
        return m.ops.channel_mix_residual_stacked(x, xb, shifts.cmix_prev[layer], w, cfg)
