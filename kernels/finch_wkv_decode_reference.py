"""Contract of `kernels.finch_wkv_decode`: a Finch-C2 time mix's step from its projections to the
input of its output norm, for one token of each of N sequences:

    decay_lora = tanh(decay_hidden) @ decay_w2               (tanh and product rounded to the dtype)
    log_decay  = -exp((time_decay + decay_lora) rounded)      float32
    k          = k * (1 - exp(log_decay)), rounded            (with use_one_minus_w)
    y          = WKV6 step (r, k, v, log_decay, u) on state_pool[slots], updated in place
    out        = y + (v2 + tanh(value2_hidden) @ value2_w2)   (each sum rounded; without v2: out = y)

The same ops and rounding points as `engine.decode_ops.finch_decay_values` followed by
`wkv6_step` and the add before the norm, so the fused kernel differs from them only by the order of
float32 sums.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .wkv6_reference import wkv6_step


def finch_wkv_decode_reference(r: Tensor, k: Tensor, v: Tensor, decay_hidden: Tensor, time_decay: Tensor,
                               decay_w2: Tensor, u: Tensor, state_pool: Tensor, slots: Tensor,
                               use_one_minus_w: bool, v2: Tensor | None = None,
                               value2_hidden: Tensor | None = None, value2_w2: Tensor | None = None) -> Tensor:
    """r, k, v, v2: [N, A] (A = H * K); decay_hidden [N, R_w], value2_hidden [N, R_v] (before tanh);
    time_decay [A]; decay_w2 [R_w, A]; value2_w2 [R_v, A]; u [H, K]; state_pool [S, H, K, V] float32;
    slots [N]. Returns out [N, A] in r's dtype."""
    N, A = r.shape
    H = u.shape[0]
    dtype = r.dtype
    decay_lora = torch.tanh(decay_hidden) @ decay_w2
    log_decay = -(time_decay + decay_lora).to(dtype).float().exp()
    if use_one_minus_w:
        k = (k * (1 - log_decay.exp())).to(dtype)
    heads = lambda t: t.reshape(N, H, -1)  # noqa: E731
    y = wkv6_step(heads(r), heads(k), heads(v), heads(log_decay), u, state_pool, slots).reshape(N, A)
    if v2 is None:
        return y
    extra = (v2 + torch.tanh(value2_hidden) @ value2_w2).to(dtype)
    return y + extra
