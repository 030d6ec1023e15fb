"""The GoldFinch model: one step over a packed batch of sequences, each catching up some new tokens.

Prefill and decode are the same call: sequence i brings `query_lens[i]` new tokens on top of the
`context_lens[i]` it has already computed (a whole prompt, a chunk of one, or one decode token).

- Finch layers see every new token (their cost is linear in the tokens).
- After the last Finch layer each new token's compressed key is written to the key cache.
- GOLD layers only compute the positions that the last logit and the carried token-shift states
  depend on (`ModelConfig.gold_tail_len` at the first GOLD layer, two fewer at each next one), each
  query attending over the whole history (end-aligned causal): prefill is linear in its length.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.dispatch import wkv_decode, wkv_prefill
from kernels.gold_kv_derive_reference import GoldKVDeriveWeights

from . import decode_fused
from . import layers as L
from .config import ModelConfig
from .gold_layers import GoldLayers, GoldWorkCounter
from .layer_ops import LayerOps, compile_requested
from .loader import Checkpoint
from .state import ContiguousKeyCache, KeyCacheView, RNNStatePool
from .step_batch import StepBatch
from .token_shift import IndexCache as _IndexCache, Windows as _Windows, select_with_prev as _select_with_prev


class GoldFinchModel(GoldLayers):
    def __init__(self, checkpoint: Checkpoint, compile_layers: bool | None = None) -> None:
        self.config: ModelConfig = checkpoint.config
        w = checkpoint.weights
        self.dtype = w["emb.weight"].dtype
        self.device = w["emb.weight"].device
        self.blocks = [L.LayerWeights(w, f"blocks.{i}.") for i in range(self.config.n_layer)]
        self._stack_projections(w)
        mix_vectors = tuple(f"att.time_maa_{n}" for n in L.mix_names(self.config))
        for block in self.blocks[: self.config.gold_start]:
            block.stack_vectors(mix_vectors, L.MIX_STACKED)
        self.emb, self.head = w["emb.weight"], w["head.weight"]
        self.ln0 = (w["blocks.0.ln0.weight"], w["blocks.0.ln0.bias"])
        self.ln_out = (w["ln_out.weight"], w["ln_out.bias"])
        self.w_compress, self.w_decompress = w["w_kv_cache_a.weight"], w["w_kv_cache_b.weight"]
        self.gold_work = GoldWorkCounter()
        # every GOLD layer's key/value derivation weights stacked once (a prompt's last step derives
        # all layers in one launch: `gold_keys.StepKeys`; not with rotary keys, which that kernel
        # does not rotate); ~21 MB at the 1.5B shape
        per_layer = [L.gold_kv_derive_weights(self.blocks[i]) for i in range(self.config.gold_start, self.config.n_layer)]
        self.gold_derive_weights = (GoldKVDeriveWeights(*(torch.stack(ts) for ts in zip(*per_layer)))
                                    if per_layer and self.config.rope is None else None)
        self.ops = LayerOps(compile_requested(self.device) if compile_layers is None else compile_layers)

    def _stack_projections(self, weights: dict[str, Tensor]) -> None:
        """Row-stacks each block's projections that read same-shaped inputs (`layers.TMIX_STACKED`,
        `layers.CMIX_STACKED`: the decode step reads each as one product) and re-points the
        checkpoint's entries to the views, so that the separate originals are freed."""
        tmix_names = L.tmix_stacked_names(self.config)
        for i, block in enumerate(self.blocks):
            stacks = [(L.CMIX_STACKED_NAMES, L.CMIX_STACKED)]
            if i < self.config.gold_start:
                extra = decode_fused.front_lora_rows(block, self.config) if decode_fused.supported(self.config) else {}
                for name, t in extra.items():  # the fused decode step's LoRA rows, after r, k, v
                    block.add(name, t)
                stacks.append((tmix_names + tuple(extra), L.TMIX_STACKED))
            for names, stacked_name in stacks:
                for name, view in block.stack_rows(names, stacked_name).items():
                    if f"blocks.{i}.{name}" in weights:
                        weights[f"blocks.{i}.{name}"] = view

    # ---- embeddings and key derivation -------------------------------------------------------
    def embed(self, token_ids: Tensor) -> Tensor:
        x = F.embedding(token_ids.long(), self.emb)
        return F.layer_norm(x, (x.shape[-1],), *self.ln0)

    def decompress(self, compressed: Tensor, token_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(proto-keys, token values) of a history: `rms_norm(W_b cat(ln0(emb), c))` and
        `rms_norm(ln0(emb))`, both [L, C]."""
        x_original = self.embed(token_ids)
        proto = L.rms_norm(F.linear(torch.cat([x_original, compressed.to(self.dtype)], -1), self.w_decompress))
        return proto, L.rms_norm(x_original)

    # ---- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, batch: StepBatch, rnn: RNNStatePool, keys: KeyCacheView, finch_out: Tensor | None = None) -> Tensor:
        """Runs the batch, updates the RNN states in their slots and appends the compressed keys.
        Returns logits [B, V] (each sequence's last new position) or [N, V] with `all_logits`.
        `finch_out` [N, C]: the Finch layers of this batch already ran (a prefill chunk replayed from
        a CUDA graph, `engine.prefill_graphs`, which updated their RNN states): the rest runs here."""
        self._idx = _IndexCache(self.device)
        self._ops = self.ops.for_tokens(batch.token_ids.shape[0])
        x = self._finch_layers(batch, rnn) if finch_out is None else finch_out
        keys.write(F.linear(x, self.w_compress), batch.token_ids)
        return self._gold_layers(x, batch, rnn, keys)

    def _finch_layers(self, batch: StepBatch, rnn: RNNStatePool) -> Tensor:
        x = self.embed(batch.token_ids)
        if self._ops.shift_inside and len(batch.query_lens) == 1:
            cu = [0, batch.query_lens[0]]
            for layer in range(self.config.n_finch):
                x = self.finch_block_one_sequence(layer, x, batch.state_slots, rnn, self._ops, cu)
            return x
        win = _Windows(starts=[0] * len(batch.query_lens), lens=list(batch.query_lens))
        for layer in range(self.config.n_finch):
            x = self._finch_block(layer, x, win, batch, rnn)
        return x

    def _finch_block(self, layer: int, x: Tensor, win: _Windows, batch: StepBatch, rnn: RNNStatePool) -> Tensor:
        cfg, w, slots = self.config, self.blocks[layer], batch.state_slots
        xa = L.layer_norm(x, w, "ln1")
        cur, prev, last = _select_with_prev(xa, win, win.starts, rnn.tmix_shift[layer, slots], self._idx)
        rnn.tmix_shift[layer, slots] = last
        r, k, v, log_decay, u, extra = self._ops.finch_tmix_projections(cur, prev, w, cfg)
        y = self._wkv(layer, r, k, v, log_decay, u, batch, rnn)
        # the residuals and ln2 inside the compiled functions: each is another pass over [N, C]
        x, xf = self._ops.finch_tmix_out(x, y, extra, w, cfg)
        cur, prev, last = _select_with_prev(xf, win, win.starts, rnn.cmix_shift[layer, slots], self._idx)
        rnn.cmix_shift[layer, slots] = last
        return self._ops.channel_mix_residual(x, cur, prev, w)  # cur: every row of x (Finch windows start at 0)

    def finch_block_one_sequence(self, layer: int, x: Tensor, slot: Tensor, rnn: RNNStatePool, ops: LayerOps,
                                 wkv_cu, last_row: Tensor | None = None) -> Tensor:
        """`_finch_block` of one sequence (state `slot`, [1]) with each token shift read inside the
        compiled function that consumes it: the same values without two [N, C] copies per layer.
        (Several sequences would need a gather per element to place each carried row: on an H100 at
        64K those mix kernels took 23.9 ms, the copying version's 12.9 ms plus the copies, ~6 ms.)
        `wkv_cu`: [0, N], or a `ChunkPlan` whose length may be below N, with `last_row` [1] the
        index of the sequence's last row (rows after it are padding: `engine.prefill_graphs`)."""
        cfg, w = self.config, self.blocks[layer]
        last = (lambda t: t[-1:]) if last_row is None else (lambda t: t.index_select(0, last_row))  # noqa: E731
        xa = L.layer_norm(x, w, "ln1")
        carried = rnn.tmix_shift[layer, slot].to(xa.dtype)  # a copy: the state is overwritten next
        rnn.tmix_shift[layer, slot] = last(xa)
        r, k, v, log_decay, u, extra = ops.finch_tmix_projections_shifted(xa, carried, w, cfg)
        H, N = cfg.n_head, cfg.head_size
        heads = lambda t: t.view(t.shape[0], H, N)  # noqa: E731
        y = wkv_prefill(heads(r), heads(k), heads(v), heads(log_decay), u, wkv_cu, rnn.wkv[layer], slot).view(r.shape)
        x, xf = ops.finch_tmix_out(x, y, extra, w, cfg)
        carried = rnn.cmix_shift[layer, slot].to(xf.dtype)
        rnn.cmix_shift[layer, slot] = last(xf)
        return ops.channel_mix_residual_shifted(x, xf, carried, w)

    def _wkv(self, layer: int, r: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, u: Tensor,
             batch: StepBatch, rnn: RNNStatePool) -> Tensor:
        """The recurrence per sequence: decodes (one token) in one call, prompts in one packed
        chunked call; Triton kernels on CUDA, the reference elsewhere (`kernels.dispatch`)."""
        H, N = self.config.n_head, self.config.head_size
        heads = lambda t: t.view(t.shape[0], H, N)  # noqa: E731
        pool, slots, lens = rnn.wkv[layer], batch.state_slots, batch.query_lens
        if all(n == 1 for n in lens):  # a decode step: no gathers at all
            return wkv_decode(heads(r), heads(k), heads(v), heads(log_decay), u, pool, slots).view(r.shape)
        offsets = [0]
        for n in lens:
            offsets.append(offsets[-1] + n)
        decode = [i for i, n in enumerate(lens) if n == 1]
        prompts = [i for i, n in enumerate(lens) if n > 1]
        if not decode:  # prompts only: the packed batch is already what the prefill kernel takes
            return wkv_prefill(heads(r), heads(k), heads(v), heads(log_decay), u, offsets, pool, slots).view(r.shape)
        y = torch.empty_like(r)
        rows = self._idx.get(("wkv_decode_rows", lens), lambda: [offsets[i] for i in decode])
        out = wkv_decode(heads(r[rows]), heads(k[rows]), heads(v[rows]), heads(log_decay[rows]), u,
                         pool, slots[self._idx.get(("wkv_decode_seqs", lens), lambda: decode)])
        y[rows] = out.reshape(len(decode), -1)
        rows = self._idx.get(("wkv_prompt_rows", lens),
                             lambda: [t for i in prompts for t in range(offsets[i], offsets[i + 1])])
        cu = [0]
        for i in prompts:
            cu.append(cu[-1] + lens[i])
        out = wkv_prefill(heads(r[rows]), heads(k[rows]), heads(v[rows]), heads(log_decay[rows]), u, cu,
                          pool, slots[self._idx.get(("wkv_prompt_seqs", lens), lambda: prompts)])
        y[rows] = out.reshape(rows.shape[0], -1)
        return y

    # ---- plain, unpaged convenience path ------------------------------------------------------
    def new_state(self, batch_size: int) -> "InferenceState":
        return InferenceState(
            rnn=RNNStatePool.allocate(self.config, batch_size, self.dtype, self.device),
            keys=ContiguousKeyCache(self.config, batch_size, self.dtype, self.device),
        )

    def forward(self, tokens: Tensor, state: "InferenceState | None" = None,
                all_logits: bool = False, logits: bool = True) -> tuple[Tensor | None, "InferenceState"]:
        """tokens [B, T]; continues `state` (a fresh one if None). Returns logits [B, V], or
        [B, T, V] with `all_logits`, and the state. `logits=False` (a chunk of a longer prompt, whose
        next chunk brings at least `gold_tail_len` tokens) skips the GOLD layers and returns None."""
        B, T = tokens.shape
        state = state or self.new_state(B)
        context = tuple(state.keys.length(i) for i in range(B))
        state.keys.set_step_lens([T] * B)
        batch = StepBatch(token_ids=tokens.reshape(-1).to(self.device), query_lens=(T,) * B,
                          context_lens=context, state_slots=torch.arange(B, device=self.device),
                          all_logits=all_logits, needs_logits=None if logits else (False,) * B)
        out = self.step(batch, state.rnn, state.keys)
        if not logits:
            return None, state
        return (out.view(B, T, -1) if all_logits else out), state


@dataclass
class InferenceState:
    """The persistent inference state of a batch of sequences on the plain path."""

    rnn: RNNStatePool
    keys: ContiguousKeyCache

    def cached_tokens(self, i: int) -> int:
        return self.keys.length(i)

    def persistent_bytes_per_token(self) -> int:
        """Bytes each cached token adds, read off the cache tensors themselves."""
        c, ids = self.keys.read(0)
        return c.shape[-1] * c.element_size() + ids.element_size()
