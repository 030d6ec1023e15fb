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

from kernels.dispatch import paged_attention, wkv_decode, wkv_prefill

from . import layers as L
from .config import ModelConfig
from .gold_keys import StepKeys
from .layer_ops import LayerOps, compile_requested
from .loader import Checkpoint
from .state import ContiguousKeyCache, KeyCacheView, RNNStatePool
from .token_shift import IndexCache as _IndexCache, Windows as _Windows, select_with_prev as _select_with_prev


@dataclass(frozen=True)
class StepBatch:
    """What the runner hands the model for one step. Tensors live on the model's device."""

    token_ids: Tensor  # [N] long: the new tokens of all sequences, packed in batch order
    query_lens: tuple[int, ...]  # new tokens per sequence (>= 1)
    context_lens: tuple[int, ...]  # tokens each sequence had computed before this step
    state_slots: Tensor  # [B] long: each sequence's RNN state slot
    all_logits: bool = False  # logits at every new position (conformance, echo) instead of the last
    # per sequence, whether its last logit is wanted (None: every one). A sequence without skips
    # the GOLD layers: a prompt chunk before the last, which the caller guarantees is at least
    # `ModelConfig.gold_tail_len` tokens, so that nothing of this chunk's GOLD layers is needed
    needs_logits: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        if self.needs_logits is not None and (len(self.needs_logits) != len(self.query_lens) or self.all_logits):
            raise ValueError("needs_logits: one entry per sequence, and not with all_logits")
        if len(self.query_lens) != len(self.context_lens) or len(self.query_lens) != self.state_slots.shape[0]:
            raise ValueError("query_lens, context_lens and state_slots must have one entry per sequence")
        if min(self.query_lens, default=1) < 1 or sum(self.query_lens) != self.token_ids.shape[0]:
            raise ValueError(f"query_lens {self.query_lens} must be >= 1 and sum to the {self.token_ids.shape[0]} tokens")


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


class GoldFinchModel:
    def __init__(self, checkpoint: Checkpoint, compile_layers: bool | None = None) -> None:
        self.config: ModelConfig = checkpoint.config
        w = checkpoint.weights
        self.dtype = w["emb.weight"].dtype
        self.device = w["emb.weight"].device
        self.blocks = [L.LayerWeights(w, f"blocks.{i}.") for i in range(self.config.n_layer)]
        self._stack_projections(w)
        self.emb, self.head = w["emb.weight"], w["head.weight"]
        self.ln0 = (w["blocks.0.ln0.weight"], w["blocks.0.ln0.bias"])
        self.ln_out = (w["ln_out.weight"], w["ln_out.bias"])
        self.w_compress, self.w_decompress = w["w_kv_cache_a.weight"], w["w_kv_cache_b.weight"]
        self.gold_work = GoldWorkCounter()
        self.ops = LayerOps(compile_requested(self.device) if compile_layers is None else compile_layers)

    def _stack_projections(self, weights: dict[str, Tensor]) -> None:
        """Row-stacks each block's projections that read same-shaped inputs (`layers.TMIX_STACKED`,
        `layers.CMIX_STACKED`: the decode step reads each as one product) and re-points the
        checkpoint's entries to the views, so that the separate originals are freed."""
        tmix_names = L.tmix_stacked_names(self.config)
        for i, block in enumerate(self.blocks):
            stacks = [(L.CMIX_STACKED_NAMES, L.CMIX_STACKED)]
            if i < self.config.gold_start:
                stacks.append((tmix_names, L.TMIX_STACKED))
            for names, stacked_name in stacks:
                for name, view in block.stack_rows(names, stacked_name).items():
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
        step_keys = StepKeys(cfg, self.decompress, keys, batch.context_lens, batch.query_lens, self.ops)
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
            # [1, H, L, D]: SDPA's fused CUDA kernels take 4-d inputs only; 3-d ones fell back to
            # its math path, in float32 for bf16 (5% of a 16K prefill on an H100)
            qi = q[bases[i]: bases[i] + n_q].transpose(0, 1)[None]
            ki, vi = keys.view(n_k, H, D).transpose(0, 1)[None], values.view(n_k, H, D).transpose(0, 1)[None]
            if n_q == 1:  # decode: the one query sees every key
                o = F.scaled_dot_product_attention(qi, ki, vi)
            else:
                visible = torch.arange(n_k, device=q.device)[None, :] <= q_pos[bases[i]: bases[i] + n_q, None]
                o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=visible[None, None])
            out[bases[i]: bases[i] + n_q] = o[0].transpose(0, 1)
            self.gold_work.query_rows += n_q
            self.gold_work.key_rows += n_q * n_k
        out = L.layer_norm(out.view(-1, H * D), w, "att.ln_x")
        return L.linear(out, w, "att.output")

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
