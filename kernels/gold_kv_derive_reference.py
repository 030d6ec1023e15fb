"""Plain-PyTorch reference of `kernels.gold_kv_derive`: one GOLD layer's keys and values of packed
rows, each derived from its own and its predecessor's proto-key and token value, stored to pages.

The arithmetic is the reference model's (`engine.layers.gold_keys_values_rows`, tested equal to it):

    xxx = xo + (xo_prev - xo) * maa_v_cache
    mk, mv = tanh(xxx @ maa_w1) split in two halves of width r, each @ maa_w2[0] / maa_w2[1]
    k1 = k + (k_prev - k) * (maa_k + mk);          v1 = xo + (xo_prev - xo) * (maa_v + mv)
    k2 = k1 + tanh(k1 @ key_w1) @ key_w2;          v2 = v1 + tanh(v1 @ value_w1) @ value_w2
    keys = layer_norm(k2) * ln_k.w + ln_k.b;       values = layer_norm(v2) * ln_v.w + ln_v.b
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class GoldKVDeriveWeights(NamedTuple):
    """One GOLD layer's key/value derivation weights (C channels, r = mix LoRA rank, R = key/value
    LoRA rank)."""

    maa_v_cache: Tensor  # [C]
    maa_w1: Tensor  # [C, 2r]: columns [0, r) feed the key's mix, [r, 2r) the value's
    maa_w2: Tensor  # [2, r, C]
    maa_k: Tensor  # [C]
    maa_v: Tensor  # [C]
    key_w1: Tensor  # [C, R]
    key_w2: Tensor  # [R, C]
    value_w1: Tensor  # [C, R]
    value_w2: Tensor  # [R, C]
    ln_k_weight: Tensor  # [C]
    ln_k_bias: Tensor
    ln_v_weight: Tensor
    ln_v_bias: Tensor


def gold_kv_derive_reference(proto_keys: Tensor, prev_proto_keys: Tensor, token_values: Tensor,
                             prev_token_values: Tensor, w: GoldKVDeriveWeights, row_slots: Tensor,
                             key_pages: Tensor, value_pages: Tensor) -> tuple[Tensor, Tensor]:
    """Same contract as `kernels.gold_kv_derive.gold_kv_derive` (one layer, or several stacked)."""
    if w.maa_w1.dim() == 3:
        out = [gold_kv_derive_reference(proto_keys, prev_proto_keys, token_values, prev_token_values,
                                        GoldKVDeriveWeights(*(t[i] for t in w)), row_slots, key_pages[i],
                                        value_pages[i]) for i in range(w.maa_w1.shape[0])]
        return torch.stack([k for k, _ in out]), torch.stack([v for _, v in out])
    k, k_prev, xo, xo_prev = proto_keys, prev_proto_keys, token_values, prev_token_values
    r = w.maa_w2.shape[1]
    dxo = xo_prev - xo
    mix = torch.tanh((xo + dxo * w.maa_v_cache) @ w.maa_w1)
    mk, mv = mix[:, :r] @ w.maa_w2[0], mix[:, r:] @ w.maa_w2[1]
    k = k + (k_prev - k) * (w.maa_k + mk)
    v = xo + dxo * (w.maa_v + mv)
    k = k + torch.tanh(k @ w.key_w1) @ w.key_w2
    v = v + torch.tanh(v @ w.value_w1) @ w.value_w2
    C = k.shape[-1]
    keys = F.layer_norm(k, (C,), w.ln_k_weight, w.ln_k_bias)
    values = F.layer_norm(v, (C,), w.ln_v_weight, w.ln_v_bias)
    stored = row_slots >= 0
    key_pages.index_copy_(0, row_slots[stored], keys[stored].to(key_pages.dtype))
    value_pages.index_copy_(0, row_slots[stored], values[stored].to(value_pages.dtype))
    return keys, values
