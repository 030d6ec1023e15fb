"""A Finch/GOLD block's channel mix with its residual, in plain PyTorch: the reference for
`kernels.channel_mix_decode`.

    xk = xf + (prev - xf) * maa_k          xr = xf + (prev - xf) * maa_r
    out = x + sigmoid(xr @ W_r^T) * (relu(xk @ W_k^T)^2 @ W_v^T)

W_k and W_r are read from one row-stacked weight [F + C, C] (`engine.layers.CMIX_STACKED`: the
ffn key rows, then the receptance rows), W_v is [C, F]. Computed in float32, returned in x's dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor


def channel_mix_decode_reference(x: Tensor, xf: Tensor, prev: Tensor, maa_k: Tensor, maa_r: Tensor,
                                 kr_weight: Tensor, value_weight: Tensor) -> Tensor:
    """x, xf, prev: [M, C]; maa_k, maa_r: [C]; kr_weight: [F + C, C]; value_weight: [C, F].
    Returns [M, C] in x's dtype."""
    F, dtype = value_weight.shape[1], x.dtype
    x, xf, prev, maa_k, maa_r, kr_weight, value_weight = (
        t.float() for t in (x, xf, prev, maa_k, maa_r, kr_weight, value_weight))
    dx = prev - xf
    k = (xf + dx * maa_k) @ kr_weight[:F].T
    r = (xf + dx * maa_r) @ kr_weight[F:].T
    return (x + torch.sigmoid(r) * (torch.relu(k) ** 2 @ value_weight.T)).to(dtype)
