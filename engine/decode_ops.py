"""The decode step's versions of the fused layer functions: few rows, so fewer, wider products.

At a handful of rows a matrix product's time is reading its weight, and each separate product
reads well below the memory bandwidth (H100, M=1: four 2048x2048 products ~20 us, the same weights
as one stacked product ~8 us). So the projections that read same-shaped inputs go through one
row-stacked weight (`layers.TMIX_STACKED`, `layers.CMIX_STACKED`) as one "diagonal block" product:
the inputs stacked [x_1; x_2; ...] times the whole stacked weight, keeping block i of rows and
block i of columns; the off-diagonal blocks are wasted arithmetic, free while the weight read
bounds the time. Above `SMALL_BATCH` rows the waste would count, and each weight block gets its own
product. Same results as `layers` up to float rounding; the general (prefill) path keeps `layers`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import layers as L
from .config import TMIX_FINCH, ModelConfig

# at most this many rows per sequence input: one diagonal-block product (its wasted arithmetic is
# then < SMALL_BATCH x the weight's size, still far below what reading the weight costs)
SMALL_BATCH = 16

# a group of inputs that multiply the same row block [start, end) of a stacked weight
Group = tuple[tuple[Tensor, ...], tuple[int, int]]


def stacked_products(groups: list[Group], stacked: Tensor) -> list[Tensor]:
    """x @ stacked[start:end].T for every input x of every group, in order. Up to SMALL_BATCH rows per
    input: one product of all inputs with the whole weight, read off its diagonal blocks (strided
    views); above: one product per group. The branch depends on shapes only."""
    B = groups[0][0][0].shape[0]
    if B <= SMALL_BATCH:
        out = F.linear(torch.cat([x for xs, _ in groups for x in xs]), stacked)
        spans = [span for xs, span in groups for _ in xs]
        return [out[i * B: (i + 1) * B, a:b] for i, (a, b) in enumerate(spans)]
    outs: list[Tensor] = []
    for xs, (a, b) in groups:
        out = F.linear(torch.cat(xs) if len(xs) > 1 else xs[0], stacked[a:b])
        outs.extend(out.split(B))
    return outs


@dataclass(frozen=True)
class DecayValue2Lora:
    """The decay and value2 LoRAs of one Finch-C2 block side by side (copies, LoRA-sized): first
    stages [C, r_w + r_v2] (columns), second stages [r_w + r_v2, dim_att] (rows)."""

    first: Tensor
    second: Tensor
    decay_rank: int

    @classmethod
    def merge(cls, w: L.LayerWeights) -> "DecayValue2Lora":
        return cls(first=torch.cat([w["att.time_decay_w1"], w["att.time_value2_w1"]], dim=1),
                   second=torch.cat([w["att.time_decay_w2"], w["att.time_value2_w2"]]),
                   decay_rank=w["att.time_decay_w1"].shape[1])


def decay_value2_loras(xw: Tensor, xv2: Tensor, w: L.LayerWeights, merged: DecayValue2Lora) -> tuple[Tensor, Tensor]:
    """`tanh(xw @ w1) @ w2` of the decay and of value2. Small batch: the first stages as one
    diagonal-block product, the second as one product of the block-diagonal input
    [[tanh(a), 0], [0, tanh(b)]] with the row-stacked second stages (the zeros add nothing)."""
    B = xw.shape[0]
    if B > SMALL_BATCH:
        return (torch.tanh(xw @ w["att.time_decay_w1"]) @ w["att.time_decay_w2"],
                torch.tanh(xv2 @ w["att.time_value2_w1"]) @ w["att.time_value2_w2"])
    r, width = merged.decay_rank, merged.first.shape[1]
    hidden = torch.tanh(torch.cat([xw, xv2]) @ merged.first)  # [2B, r_w + r_v2]
    hidden = torch.cat([F.pad(hidden[:B, :r], (0, width - r)), F.pad(hidden[B:, r:], (r, 0))])
    out = hidden @ merged.second
    return out[:B], out[B:]


def finch_tmix_in_stacked(x: Tensor, prev_xa: Tensor, w: L.LayerWeights, merged: DecayValue2Lora | None,
                          cfg: ModelConfig):
    """`layers.finch_tmix_in` through the stacked projections (and, given `merged`, the merged
    decay/value2 LoRAs); returns (xa, r, k, v, log_decay, u, extra), r/k/v possibly strided views
    with contiguous rows."""
    xa = L.layer_norm(x, w, "ln1")
    xs = L.finch_mixes(xa, prev_xa, w, cfg, fused=False)
    A = cfg.dim_att
    blocks = [((xs["r"],), (0, A)), ((xs["k"],), (A, 2 * A))]
    if cfg.tmix == TMIX_FINCH:
        blocks += [((xs["v"],), (2 * A, 3 * A)), ((xs["g"],), (3 * A, 4 * A))]
        r, k, v, g = stacked_products(blocks, w[L.TMIX_STACKED])
        decay_lora = torch.tanh(xs["w"] @ w["att.time_decay_w1"]) @ w["att.time_decay_w2"]
        return xa, r, k, v, _log_decay(decay_lora, w, r.dtype), w["att.time_faaaa"], F.silu(g)
    blocks.append(((xs["v"], xs["v2"]) if cfg.use_v2 else (xs["v"],), (2 * A, 3 * A)))
    r, k, v, *v2 = stacked_products(blocks, w[L.TMIX_STACKED])
    if cfg.use_v2 and merged is not None:
        decay_lora, value2_lora = decay_value2_loras(xs["w"], xs["v2"], w, merged)
    else:
        decay_lora = torch.tanh(xs["w"] @ w["att.time_decay_w1"]) @ w["att.time_decay_w2"]
        value2_lora = torch.tanh(xs["v2"] @ w["att.time_value2_w1"]) @ w["att.time_value2_w2"] if cfg.use_v2 else None
    log_decay = _log_decay(decay_lora, w, r.dtype)
    if cfg.use_one_minus_w:
        k = (k * (1 - log_decay.exp())).to(r.dtype)
    extra = (v2[0] + value2_lora).to(r.dtype) if cfg.use_v2 else None
    u = torch.zeros_like(w["att.time_faaaa"]) if cfg.use_v2 else w["att.time_faaaa"]
    return xa, r, k, v, log_decay, u, extra


def _log_decay(decay_lora: Tensor, w: L.LayerWeights, dtype: torch.dtype) -> Tensor:
    """-exp(w_raw) in float32, w_raw rounded to the activation dtype first as `layers` does."""
    return -(w["att.time_decay"] + decay_lora).to(dtype).float().exp()


def channel_mix_residual_stacked(x: Tensor, xf: Tensor, prev: Tensor, w: L.LayerWeights, cfg: ModelConfig) -> Tensor:
    """`layers.channel_mix_residual` with ffn.key and ffn.receptance as one stacked product."""
    dx = prev - xf
    xk = xf + dx * w["ffn.time_maa_k"]
    xr = xf + dx * w["ffn.time_maa_r"]
    Fd = cfg.dim_ffn
    k, r = stacked_products([((xk,), (0, Fd)), ((xr,), (Fd, Fd + cfg.n_embd))], w[L.CMIX_STACKED])
    return x + torch.sigmoid(r) * L.linear(torch.relu(k) ** 2, w, "ffn.value")


# ---- the new tokens' GOLD keys and values, every layer at once -----------------------------------
@dataclass(frozen=True)
class GoldKVWeights:
    """What `layers.gold_keys_values_rows` reads, of every GOLD layer, stacked along a leading layer
    axis (n) and, where keys and values have one weight each, a kind axis (key, value). Copies: they
    are LoRA-sized."""

    maa_v_cache: Tensor  # [n, 1, C]
    maa_w1: Tensor  # [n, C, n_mix * r]: time_maa_kv_w1
    maa_w2: Tensor  # [n, n_mix, r, C]: time_maa_kv_w2 (mixes of the key, then the value)
    maa_kv: Tensor  # [n, 2, 1, C]: time_maa_k, time_maa_v
    lora_w1: Tensor  # [n, 2, C, R]: time_key_w1, time_value_w1
    lora_w2: Tensor  # [n, 2, R, C]: time_key_w2, time_value_w2
    ln_weight: Tensor  # [n, 2, 1, C]: ln_k, ln_v
    ln_bias: Tensor  # [n, 2, 1, C]

    @classmethod
    def stack(cls, blocks: list[L.LayerWeights]) -> "GoldKVWeights":
        def layers(name: str) -> Tensor:
            return torch.stack([w[name] for w in blocks])

        def kinds(key_name: str, value_name: str) -> Tensor:
            return torch.stack([layers(key_name), layers(value_name)], dim=1)

        vector = lambda t: t[..., None, :]  # noqa: E731  [.., C] -> [.., 1, C], broadcast over rows
        return cls(maa_v_cache=vector(layers("att.time_maa_v_cache")), maa_w1=layers("att.time_maa_kv_w1"),
                   maa_w2=layers("att.time_maa_kv_w2"), maa_kv=vector(kinds("att.time_maa_k", "att.time_maa_v")),
                   lora_w1=kinds("att.time_key_w1", "att.time_value_w1"),
                   lora_w2=kinds("att.time_key_w2", "att.time_value_w2"),
                   ln_weight=vector(kinds("att.ln_k.weight", "att.ln_v.weight")),
                   ln_bias=vector(kinds("att.ln_k.bias", "att.ln_v.bias")))


def decode_decompress_rows(flat_keys: Tensor, flat_ids: Tensor, prev_slots: Tensor, compressed: Tensor,
                           token_ids: Tensor, emb: Tensor, ln0_weight: Tensor, ln0_bias: Tensor,
                           w_decompress: Tensor) -> tuple[Tensor, Tensor]:
    """`GoldFinchModel.decompress` of a decode step's rows: the previous tokens' (their compressed
    keys and ids gathered from the flat pools at `prev_slots` [B]) then the new tokens' (`compressed`
    [B, Cc], `token_ids` [B]); returns proto-keys and token values [2B, C]. One function, so that
    compiled (the decode step's graph) the gathers, norms and concatenations fuse into a few
    kernels instead of ~17 small launches."""
    c = torch.cat([flat_keys.index_select(0, prev_slots), compressed.to(flat_keys.dtype)])
    ids = torch.cat([flat_ids.index_select(0, prev_slots).long(), token_ids])
    x = F.layer_norm(F.embedding(ids, emb), (emb.shape[-1],), ln0_weight, ln0_bias)
    proto = L.rms_norm(F.linear(torch.cat([x, c.to(x.dtype)], -1), w_decompress))
    return proto, L.rms_norm(x)


def gold_keys_values_rows_all_layers(k: Tensor, k_prev: Tensor, xo: Tensor, xo_prev: Tensor,
                                     w: GoldKVWeights) -> tuple[Tensor, Tensor]:
    """`layers.gold_keys_values_rows` of every GOLD layer at once (the decode step derives its new
    tokens' keys and values this way): the inputs ([N, C] each) are the same for all layers, only the
    weights differ, so each step of it is one batched product or one pointwise pass over [n, 2, N, C]
    (n layers, keys and values). Returns keys and values [n, N, C]."""
    n, N, C = w.maa_w1.shape[0], xo.shape[0], xo.shape[-1]
    dxo = xo_prev - xo
    xxx = xo + dxo * w.maa_v_cache  # [n, N, C]
    mix = torch.tanh(torch.matmul(xxx, w.maa_w1)).view(n, N, w.maa_w2.shape[1], -1).transpose(1, 2)
    mixes = torch.matmul(mix, w.maa_w2)  # [n, 2, N, C]: the key's and the value's
    kv = torch.stack([k, xo]) + torch.stack([k_prev - k, dxo]) * (w.maa_kv + mixes)
    kv = kv + torch.matmul(torch.tanh(torch.matmul(kv, w.lora_w1)), w.lora_w2)
    kv = F.layer_norm(kv, (C,)) * w.ln_weight + w.ln_bias
    return kv[:, 0], kv[:, 1]
