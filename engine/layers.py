"""The GoldFinch blocks' arithmetic on packed tokens, as in the reference code.

Activations are packed: [N, C] rows of several sequences. Token shift is done by the caller, which
passes each row's previous row (`prev`): the carried state for a sequence's first new token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.dispatch import finch_mix
from kernels.gold_kv_derive_reference import GoldKVDeriveWeights

from .config import TMIX_FINCH, ModelConfig

RMS_EPS = 1e-8
# row-stacked projection matrices (`LayerWeights.stack_rows`): the decode step reads each as one product
TMIX_STACKED = "att.projections_stacked"  # receptance, key, value (and gate in x060) of a Finch block
CMIX_STACKED = "ffn.kr_stacked"  # key, receptance of every block's channel mix
CMIX_STACKED_NAMES = ("ffn.key.weight", "ffn.receptance.weight")


def tmix_stacked_names(cfg: ModelConfig) -> tuple[str, ...]:
    """The Finch time-mix projections stacked under TMIX_STACKED, in row order."""
    names = ("att.receptance.weight", "att.key.weight", "att.value.weight")
    return names + ("att.gate.weight",) if cfg.tmix == TMIX_FINCH else names


def rms_norm(x: Tensor, eps: float = RMS_EPS) -> Tensor:
    """The reference's weightless RMS norm: eps is added to the RMS, not under the root."""
    return x / ((x.size(-1) ** -0.5) * x.norm(2, dim=-1, keepdim=True) + eps)


class LayerWeights:
    """One block's tensors by their short names (`att.key.weight`), with [1, 1, C] mixing vectors
    flattened to [C] once."""

    def __init__(self, weights: dict[str, Tensor], prefix: str) -> None:
        self._w = {k[len(prefix):]: (v.reshape(-1) if k.split(".")[-1].startswith("time_maa_")
                                     and v.dim() == 3 and v.shape[0] == 1 else v)
                   for k, v in weights.items() if k.startswith(prefix)}
        for name in ("att.time_decay",):
            if name in self._w:
                self._w[name] = self._w[name].reshape(-1)

    def __getitem__(self, name: str) -> Tensor:
        return self._w[name]

    def stack_rows(self, names: tuple[str, ...], stacked_name: str) -> dict[str, Tensor]:
        """Concatenates the named matrices (same width) into one, kept as `stacked_name`, and
        re-points each name to its row slice: a contiguous view, so the weights exist once and the
        general path reads exactly what it read before. Returns the views by name."""
        stacked = torch.cat([self._w[n] for n in names])
        views, start = {}, 0
        for n in names:
            rows = self._w[n].shape[0]
            views[n] = self._w[n] = stacked[start: start + rows]
            start += rows
        self._w[stacked_name] = stacked
        return views

    def add(self, name: str, t: Tensor) -> None:
        """Keeps a tensor derived from the checkpoint's (a transposed LoRA for the decode step)."""
        self._w[name] = t

    def stack_vectors(self, names: tuple[str, ...], stacked_name: str) -> None:
        """Keeps the named same-length vectors also as one [n, C] tensor `stacked_name` (a copy:
        vectors are small)."""
        self._w[stacked_name] = torch.stack([self._w[n] for n in names])

    def __contains__(self, name: str) -> bool:
        return name in self._w


def layer_norm(x: Tensor, w: LayerWeights, name: str) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), w[f"{name}.weight"], w[f"{name}.bias"])


def linear(x: Tensor, w: LayerWeights, name: str) -> Tensor:
    return F.linear(x, w[f"{name}.weight"])


MIX_STACKED = "att.time_maa_stacked"  # [n_mix, C]: a Finch block's mix vectors, for `kernels.finch_mix`


def mix_names(cfg: ModelConfig) -> tuple[str, ...]:
    """The Finch time mix's mixed inputs, in the order of time_maa_w2's rows."""
    return ("w", "k", "v", "r", "g") if cfg.tmix == TMIX_FINCH else ("r", "k", "v", "w", "v2")


def finch_mixes(x: Tensor, prev: Tensor, w: LayerWeights, cfg: ModelConfig, shifted: bool = False,
                fused: bool = True) -> dict[str, Tensor]:
    """The token-shift mixes of a Finch time mix, one [N, C] input per projection, by its short name
    (w, k, v, r and g in x060; r, k, v, w and v2 in x060c2). prev: each row's previous row [N, C], or
    with `shifted` the row before the first of x's rows, which are one sequence ([1, C]).

    `fused`: the LoRA's second product and the mixing as one call (`kernels.dispatch.finch_mix`, a
    Triton kernel on CUDA: H100, 1.5B shape, engine prefill 2.5-3% faster); else a batched matmul and
    a pass that `torch.compile` fuses, which a decode step keeps (its few rows: batch 1 at 4K,
    2.54-2.57 ms a step this way, 2.61 ms fused), as does anything computing gradients."""
    full_prev = token_shift(x, prev) if shifted else prev
    dx = full_prev - x
    xxx = x + dx * w["att.time_maa_x"]
    names = mix_names(cfg)
    h = torch.tanh(xxx @ w["att.time_maa_w1"])
    # the op has no backward: anything computing gradients (tools/train_forward.py) takes PyTorch's
    if not fused or (torch.is_grad_enabled() and any(t.requires_grad for t in (x, prev, h))):
        mix = torch.bmm(h.view(x.shape[0], len(names), -1).transpose(0, 1), w["att.time_maa_w2"])  # [n_mix, N, C]
        return {n: x + dx * (w[f"att.time_maa_{n}"] + m) for n, m in zip(names, mix.unbind(0))}
    maa = w[MIX_STACKED] if MIX_STACKED in w else torch.stack([w[f"att.time_maa_{n}"] for n in names])
    mixed = finch_mix(x, prev, h, w["att.time_maa_w2"], maa, shifted)
    return dict(zip(names, mixed.unbind(0)))


def finch_tmix_projections(x: Tensor, prev: Tensor, w: LayerWeights, cfg: ModelConfig, shifted: bool = False):
    """Everything of a Finch time mix before the WKV recurrence (`prev`, `shifted`: as `finch_mixes`).

    Returns r, k, v, log-decay w (float32, `-exp(w_raw)`), u, and the extra of each variant:
    the gate (x060) or v2 (x060c2), all [N, dim_att]."""
    xs = finch_mixes(x, prev, w, cfg, shifted)
    r = linear(xs["r"], w, "att.receptance")
    k = linear(xs["k"], w, "att.key")
    v = linear(xs["v"], w, "att.value")
    w_raw = (w["att.time_decay"] + torch.tanh(xs["w"] @ w["att.time_decay_w1"]) @ w["att.time_decay_w2"]).to(r.dtype)
    log_decay = -w_raw.float().exp()
    if cfg.tmix == TMIX_FINCH:
        return r, k, v, log_decay, w["att.time_faaaa"], F.silu(linear(xs["g"], w, "att.gate"))
    if cfg.use_one_minus_w:
        k = (k * (1 - log_decay.exp())).to(r.dtype)
    extra = None
    if cfg.use_v2:
        xv2 = xs["v2"]
        extra = (linear(xv2, w, "att.value")
                 + torch.tanh(xv2 @ w["att.time_value2_w1"]) @ w["att.time_value2_w2"]).to(r.dtype)
    u = torch.zeros_like(w["att.time_faaaa"]) if cfg.use_v2 else w["att.time_faaaa"]
    return r, k, v, log_decay, u, extra


def finch_tmix_output(y: Tensor, extra: Tensor | None, w: LayerWeights, cfg: ModelConfig) -> Tensor:
    """Everything of a Finch time mix after the recurrence; y: [N, dim_att]. Norms in float32 as
    the reference does at inference."""
    dtype = y.dtype
    ln_w, ln_b = w["att.ln_x.weight"].float(), w["att.ln_x.bias"].float()
    if cfg.tmix == TMIX_FINCH:
        y = F.group_norm(y.float(), cfg.n_head, ln_w, ln_b, eps=1e-5 * cfg.head_size_divisor ** 2)
        return linear(y.to(dtype) * extra, w, "att.output")
    if extra is not None:
        y = y + extra
    y = F.layer_norm(y.float(), (y.shape[-1],), ln_w, ln_b)
    return linear(y.to(dtype), w, "att.output")


def channel_mix(x: Tensor, prev: Tensor, w: LayerWeights) -> Tensor:
    dx = prev - x
    xk = x + dx * w["ffn.time_maa_k"]
    xr = x + dx * w["ffn.time_maa_r"]
    kv = linear(torch.relu(linear(xk, w, "ffn.key")) ** 2, w, "ffn.value")
    return torch.sigmoid(linear(xr, w, "ffn.receptance")) * kv


def gold_query(x: Tensor, prev: Tensor, w: LayerWeights) -> Tensor:
    """The GOLD layer's query rows (before heads and rotary), layer-normed."""
    dx = prev - x
    xxx = x + dx * w["att.time_maa_x"]
    mq = torch.tanh(xxx @ w["att.time_maa_q_w1"]) @ w["att.time_maa_q_w2"]
    return layer_norm(linear(x + dx * (w["att.time_maa_q"] + mq), w, "att.query"), w, "att.ln_q")


def shift_one(x: Tensor) -> Tensor:
    """x[t-1] for every t of one sequence's full history, zero before its first token."""
    return torch.cat([torch.zeros_like(x[:1]), x[:-1]])


def gold_keys_values(proto_keys: Tensor, token_values: Tensor, w: LayerWeights) -> tuple[Tensor, Tensor]:
    """One GOLD layer's keys and values for every token of one sequence's history.

    proto_keys: [L, C], the decompressed keys `rms_norm(w_kv_cache_b(cat(ln0(emb), compressed)))`;
    token_values: [L, C], `rms_norm(ln0(emb(token)))`. Each token's key and value depend only on it
    and on the token before it (a zero vector before the first)."""
    return gold_keys_values_rows(proto_keys, shift_one(proto_keys), token_values, shift_one(token_values), w)


def gold_keys_values_rows(k: Tensor, k_prev: Tensor, xo: Tensor, xo_prev: Tensor,
                          w: LayerWeights) -> tuple[Tensor, Tensor]:
    """Keys and values of independent rows, each given with its predecessor's proto-key and token
    value ([N, C] each): a decode step derives only its new tokens this way."""
    dxo = xo_prev - xo
    xxx = xo + dxo * w["att.time_maa_v_cache"]
    n_mix = w["att.time_maa_kv_w2"].shape[0]
    mix = torch.tanh(xxx @ w["att.time_maa_kv_w1"]).view(xo.shape[0], n_mix, -1).transpose(0, 1)
    mk, mv = torch.bmm(mix, w["att.time_maa_kv_w2"]).unbind(0)
    k = k + (k_prev - k) * (w["att.time_maa_k"] + mk)
    v = xo + dxo * (w["att.time_maa_v"] + mv)
    k = k + torch.tanh(k @ w["att.time_key_w1"]) @ w["att.time_key_w2"]
    v = v + torch.tanh(v @ w["att.time_value_w1"]) @ w["att.time_value_w2"]
    return layer_norm(k, w, "att.ln_k"), layer_norm(v, w, "att.ln_v")


def gold_kv_derive_weights(w: LayerWeights) -> GoldKVDeriveWeights:
    """What `kernels.dispatch.gold_kv_derive` reads of one GOLD block (views, no copies)."""
    return GoldKVDeriveWeights(
        maa_v_cache=w["att.time_maa_v_cache"], maa_w1=w["att.time_maa_kv_w1"], maa_w2=w["att.time_maa_kv_w2"],
        maa_k=w["att.time_maa_k"], maa_v=w["att.time_maa_v"], key_w1=w["att.time_key_w1"],
        key_w2=w["att.time_key_w2"], value_w1=w["att.time_value_w1"], value_w2=w["att.time_value_w2"],
        ln_k_weight=w["att.ln_k.weight"], ln_k_bias=w["att.ln_k.bias"], ln_v_weight=w["att.ln_v.weight"],
        ln_v_bias=w["att.ln_v.bias"])


def rotary(x: Tensor, positions: Tensor, theta: float, rescale: float) -> Tensor:
    """Rotates [L, H, D] rows at absolute `positions` [L] as the reference does (adjacent channel
    pairs as complex numbers, frequencies theta^-(2i/D) / rescale); only relative positions matter.
    Leading dims broadcast: [n, L, H, D] rotates n stacks of the same L rows (every GOLD layer's keys)."""
    D = x.shape[-1]
    velocity = theta ** -(torch.arange(0, D, 2, dtype=torch.float64, device=x.device) / D) / rescale
    angles = torch.outer(positions.double(), velocity)
    rot = torch.polar(torch.ones_like(angles), angles)[:, None, :]  # [L, 1, D/2]
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * rot
    return torch.view_as_real(xc).flatten(-2).to(x.dtype)


# ---- whole stretches between a block's state reads and writes (the decode step compiles each
# into a few fused kernels: a batch-1 step is bound by its kernel count) ---------------------------
def finch_tmix_in(x: Tensor, prev_xa: Tensor, w: LayerWeights, cfg: ModelConfig):
    """ln1 and the time-mix projections; returns (xa, r, k, v, log_decay, u, extra)."""
    xa = layer_norm(x, w, "ln1")
    return (xa, *finch_tmix_projections(xa, prev_xa, w, cfg))


def finch_tmix_out(x: Tensor, y: Tensor, extra: Tensor | None, w: LayerWeights, cfg: ModelConfig):
    """Residual of the time mix and ln2; returns (x, xf)."""
    x = x + finch_tmix_output(y, extra, w, cfg)
    return x, layer_norm(x, w, "ln2")


def channel_mix_residual(x: Tensor, xf: Tensor, prev: Tensor, w: LayerWeights) -> Tensor:
    return x + channel_mix(xf, prev, w)


# ---- the same with one sequence's token shift inside (compiled, the shift becomes an offset read in
# the first fused kernel instead of a materialised [N, C] copy of the shifted rows) ---------------
def token_shift(x: Tensor, carried: Tensor) -> Tensor:
    """The previous row of every row of one sequence; carried: [1, C], the row before its first."""
    return torch.cat([carried, x[:-1]])


def finch_tmix_projections_shifted(x: Tensor, carried: Tensor, w: LayerWeights, cfg: ModelConfig):
    return finch_tmix_projections(x, carried, w, cfg, shifted=True)


def channel_mix_residual_shifted(x: Tensor, xf: Tensor, carried: Tensor, w: LayerWeights) -> Tensor:
    return x + channel_mix(xf, token_shift(xf, carried), w)


def gold_query_in(x: Tensor, prev_xa: Tensor, w: LayerWeights):
    """ln1 and the GOLD query; returns (xa, q)."""
    xa = layer_norm(x, w, "ln1")
    return xa, gold_query(xa, prev_xa, w)


def gold_attention_out(x: Tensor, attended: Tensor, w: LayerWeights):
    """Output projection and residual of GOLD attention, and ln2; returns (x, xb)."""
    x = x + linear(layer_norm(attended, w, "att.ln_x"), w, "att.output")
    return x, layer_norm(x, w, "ln2")
