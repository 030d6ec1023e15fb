"""The decode step's blocks in fewer, fused kernels (`kernels.decode_norm_mix`, `kernels.decode_gemv`,
`kernels.finch_wkv_decode`).

At batch 1 a block is bound by its kernel count as much as by its weights (H100, 1.5B shape: a
Finch block ran 25 kernels for 92 us, of which 48 us read the large weights). Here each layer norm,
the token-shift mixes after it and the time mix's LoRA first stage are one launch; the decay and
value2 LoRAs' first stages are extra rows of the stacked r/k/v weight (one product reads r, k, v, v2
and both LoRAs' inputs); their second stages, the key scaling, the WKV step and the v2 add are one
launch; activations and residuals are applied in the products before their store. A Finch block is
9 launches (~65 us at batch 1 on an H100, 92 unfused), a GOLD block 11 with its attention (~72
us, 88 unfused).

Same arithmetic and rounding points as `engine.decode_step`'s unfused blocks (the order of float32
sums aside): tested against them. Used on CUDA for Finch-C2 models up to `decode_ops.SMALL_BATCH`
rows; larger batches are bound by the weights, not the launches, and keep the unfused blocks (as
does the CPU, where these would run the kernels' references).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.decode_gemv_reference import ColumnSegments
from kernels.dispatch import decode_gemv, decode_norm_mix, finch_mix, finch_wkv_decode, plan_columns, split_counters

from . import layers as L
from .config import TMIX_FINCH, ModelConfig
from .decode_ops import SMALL_BATCH

LN_EPS = 1e-5  # F.layer_norm's default, as the model's norms use it
FRONT_LORA_ROWS = ("att.time_decay_w1_T", "att.time_value2_w1_T")  # extra rows of layers.TMIX_STACKED


def supported(cfg: ModelConfig) -> bool:
    """Finch-C2 models whose stacked weights' segments fall on the products' 16-column blocks and
    whose heads are powers of two (the WKV kernel's tiles); others keep the unfused blocks."""
    aligned = cfg.n_embd % 16 == 0 and cfg.dim_att % 16 == 0 and cfg.dim_ffn % 16 == 0
    return cfg.tmix != TMIX_FINCH and aligned and cfg.head_size & (cfg.head_size - 1) == 0


def front_lora_rows(w: L.LayerWeights, cfg: ModelConfig) -> dict[str, Tensor]:
    """The LoRA first stages that the stacked time-mix weight carries as extra rows (transposed
    copies, LoRA-sized), by name: `GoldFinchModel` stacks them after r, k, v."""
    rows = {FRONT_LORA_ROWS[0]: w["att.time_decay_w1"].T.contiguous()}
    if cfg.use_v2:
        rows[FRONT_LORA_ROWS[1]] = w["att.time_value2_w1"].T.contiguous()
    return rows


@dataclass(frozen=True)
class ChannelMixWeights:
    mix: Tensor  # [2, C]: time_maa_k, time_maa_r (the groups of the stacked key/receptance product)
    plan: object  # the stacked product's column plan


@dataclass(frozen=True)
class FinchDecodeWeights:
    maa_w1_t: Tensor  # [n_mix * r, C]
    maa_x: Tensor  # [1, C]
    front_plan: object  # groups of TMIX_STACKED's columns: r, k, v (+ v2), decay LoRA, value2 LoRA
    u: Tensor  # the bonus (zeros when the model has v2), made once rather than every step
    cmix: ChannelMixWeights


@dataclass(frozen=True)
class GoldDecodeWeights:
    q_w1_t: Tensor  # [r, C]
    maa_x: Tensor  # [1, C]
    q_w2: Tensor  # [1, r, C]
    maa_q: Tensor  # [1, C]
    cmix: ChannelMixWeights


def _channel_mix(w: L.LayerWeights, cfg: ModelConfig, device) -> ChannelMixWeights:
    Fd = cfg.dim_ffn
    segments = ColumnSegments(ends=(Fd, Fd + cfg.n_embd), groups=((0,), (1,)))
    return ChannelMixWeights(mix=torch.stack([w["ffn.time_maa_k"], w["ffn.time_maa_r"]]),
                             plan=plan_columns(segments, cfg.n_embd, device))


def _finch(w: L.LayerWeights, cfg: ModelConfig, device) -> FinchDecodeWeights:
    A, r_w = cfg.dim_att, w["att.time_decay_w1"].shape[1]
    names = L.mix_names(cfg)  # the mixed inputs' order: the groups of the stacked product
    group = {n: i for i, n in enumerate(names)}
    ends, groups = [A, 2 * A, 3 * A, 3 * A + r_w], [(group["r"],), (group["k"],), (group["v"],), (group["w"],)]
    if cfg.use_v2:
        groups[2] = (group["v"], group["v2"])
        ends.append(3 * A + r_w + w["att.time_value2_w1"].shape[1])
        groups.append((group["v2"],))
    if w[L.TMIX_STACKED].shape[0] != ends[-1]:
        raise ValueError(f"{L.TMIX_STACKED}: {w[L.TMIX_STACKED].shape[0]} rows, the fused decode expects {ends[-1]}")
    return FinchDecodeWeights(
        maa_w1_t=w["att.time_maa_w1"].T.contiguous(), maa_x=w["att.time_maa_x"].view(1, -1),
        front_plan=plan_columns(ColumnSegments(tuple(ends), tuple(groups)), cfg.n_embd, device),
        u=torch.zeros_like(w["att.time_faaaa"]) if cfg.use_v2 else w["att.time_faaaa"],
        cmix=_channel_mix(w, cfg, device))


def _gold(w: L.LayerWeights, cfg: ModelConfig, device) -> GoldDecodeWeights:
    return GoldDecodeWeights(q_w1_t=w["att.time_maa_q_w1"].T.contiguous(), maa_x=w["att.time_maa_x"].view(1, -1),
                             q_w2=w["att.time_maa_q_w2"][None], maa_q=w["att.time_maa_q"].view(1, -1),
                             cmix=_channel_mix(w, cfg, device))


class FusedBlocks:
    """A model's blocks for the fused decode step (weights prepared once)."""

    def __init__(self, model) -> None:
        cfg, dev = model.config, model.device
        self.model, self.cfg = model, cfg
        self.finch = [_finch(model.blocks[i], cfg, dev) for i in range(cfg.n_finch)]
        self.gold = [_gold(model.blocks[i], cfg, dev) for i in range(cfg.gold_start, cfg.n_layer)]
        self.split_counters = split_counters(dev)  # the value products' split-K arrivals

    @staticmethod
    def applies(batch: int) -> bool:
        return batch <= SMALL_BATCH

    def finch_block(self, layer: int, x: Tensor, tmix_prev: Tensor, cmix_prev: Tensor, wkv_states: Tensor,
                    slots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One Finch block: returns (x, xa, xf), xa and xf the next step's token-shift rows; the
        WKV states at `slots` are updated in place."""
        cfg, fw, w = self.cfg, self.finch[layer], self.model.blocks[layer]
        B, C, A = x.shape[0], cfg.n_embd, cfg.dim_att
        xa, h = x.new_empty(B, C), x.new_empty(B, fw.maa_w1_t.shape[0])
        decode_norm_mix(x, _ln(w, "ln1"), ln_out=xa, prev=tmix_prev, mix=fw.maa_x, lora_w1t=fw.maa_w1_t, lora_out=h)
        names = L.mix_names(cfg)
        mixed = finch_mix(xa, tmix_prev, h, w["att.time_maa_w2"], w[L.MIX_STACKED], False)  # [n_mix, B, C]
        out = x.new_empty(len(names) * B, w[L.TMIX_STACKED].shape[0])
        decode_gemv(mixed.view(-1, C), w[L.TMIX_STACKED], out, B, fw.front_plan)
        rows = {n: slice(i * B, (i + 1) * B) for i, n in enumerate(names)}
        r_w = w["att.time_decay_w1"].shape[1]
        v2 = {}
        if cfg.use_v2:
            v2 = dict(v2=out[rows["v2"], 2 * A:3 * A], value2_hidden=out[rows["v2"], 3 * A + r_w:],
                      value2_w2=w["att.time_value2_w2"])
        y = finch_wkv_decode(out[rows["r"], :A], out[rows["k"], A:2 * A], out[rows["v"], 2 * A:3 * A],
                             out[rows["w"], 3 * A:3 * A + r_w], w["att.time_decay"], w["att.time_decay_w2"], fw.u,
                             wkv_states, slots, cfg.use_one_minus_w, **v2)
        normed = torch.empty_like(y)
        decode_norm_mix(y, _ln(w, "att.ln_x"), ln_out=normed)
        x = decode_gemv(normed, w["att.output.weight"], torch.empty_like(x), B, activation="residual", residual=x)
        x, xf = self.channel_mix(layer, x, cmix_prev)
        return x, xa, xf

    def embed(self, token_ids: Tensor) -> Tensor:
        """`GoldFinchModel.embed`, its norm through the fused kernel."""
        m = self.model
        x = torch.nn.functional.embedding(token_ids, m.emb)
        normed = torch.empty_like(x)
        decode_norm_mix(x, (*m.ln0, LN_EPS), ln_out=normed)
        return normed

    def logits(self, x: Tensor) -> Tensor:
        """The output norm and head (the head read at ~3.0 TB/s on an H100 rather than cuBLAS's 2.8)."""
        m = self.model
        normed = torch.empty_like(x)
        decode_norm_mix(x, (*m.ln_out, LN_EPS), ln_out=normed)
        return decode_gemv(normed, m.head, x.new_empty(x.shape[0], m.head.shape[0]), x.shape[0])

    def gold_query(self, j: int, layer: int, x: Tensor, prev: Tensor):
        """ln1 and the GOLD query: (xa, q) as `layers.gold_query_in` returns them."""
        gw, w = self.gold[j], self.model.blocks[layer]
        B, C = x.shape
        xa, h = x.new_empty(B, C), x.new_empty(B, gw.q_w1_t.shape[0])
        decode_norm_mix(x, _ln(w, "ln1"), ln_out=xa, prev=prev, mix=gw.maa_x, lora_w1t=gw.q_w1_t, lora_out=h)
        xq = finch_mix(xa, prev, h, gw.q_w2, gw.maa_q, False)[0]
        q = decode_gemv(xq, w["att.query.weight"], x.new_empty(B, w["att.query.weight"].shape[0]), B)
        q_normed = torch.empty_like(q)
        decode_norm_mix(q, _ln(w, "att.ln_q"), ln_out=q_normed)
        return xa, q_normed

    def gold_back(self, layer: int, x: Tensor, attended: Tensor) -> Tensor:
        w = self.model.blocks[layer]
        normed = torch.empty_like(attended)
        decode_norm_mix(attended, _ln(w, "att.ln_x"), ln_out=normed)
        return decode_gemv(normed, w["att.output.weight"], torch.empty_like(x), x.shape[0], activation="residual",
                           residual=x)

    def channel_mix(self, layer: int, x: Tensor, prev: Tensor) -> tuple[Tensor, Tensor]:
        """ln2 and the channel mix with its residual: (x, xf), xf the next step's shift row."""
        cfg, w = self.cfg, self.model.blocks[layer]
        cm = self.finch[layer].cmix if layer < cfg.n_finch else self.gold[layer - cfg.gold_start].cmix
        B, C, Fd = x.shape[0], cfg.n_embd, cfg.dim_ffn
        xf, mixed, kr = x.new_empty(B, C), x.new_empty(2 * B, C), x.new_empty(2 * B, Fd + C)
        decode_norm_mix(x, _ln(w, "ln2"), ln_out=xf, prev=prev, mix=cm.mix, out=mixed)
        decode_gemv(mixed, w[L.CMIX_STACKED], kr, B, cm.plan, activation="relu_square", act_cols=Fd)
        out = decode_gemv(kr[:B, :Fd], w["ffn.value.weight"], torch.empty_like(x), B, activation="gated_residual",
                          residual=x, gate=kr[B:, Fd:], split_counters=self.split_counters)
        return out, xf


def _ln(w: L.LayerWeights, name: str) -> tuple[Tensor, Tensor, float]:
    return w[f"{name}.weight"], w[f"{name}.bias"], LN_EPS

