"""The token-shift mixes of a Finch time mix (PyTorch reference of `kernels.finch_mix`).

    out[n] = x + (prev - x) * (maa[n] + h[:, n R:(n+1) R] @ w2[n])        n = 0 .. n_mix - 1

x: [N, C], the time mix's normed input; prev: [N, C], each row's previous row, or with `shifted` a
[1, C] row before x's first (x's rows are then one sequence and row t's previous row is x[t - 1]);
h: [N, n_mix * R], the LoRA hidden layer tanh(xxx @ time_maa_w1); w2: [n_mix, R, C], time_maa_w2;
maa: [n_mix, C], the mixes' time_maa_* vectors. Returns [n_mix, N, C] in x's dtype: the arithmetic
of `engine.layers.finch_mixes`, op for op (so the CPU path is unchanged).
"""
from __future__ import annotations

import torch
from torch import Tensor


def finch_mix_reference(x: Tensor, prev: Tensor, h: Tensor, w2: Tensor, maa: Tensor, shifted: bool) -> Tensor:
    if shifted:
        prev = torch.cat([prev, x[:-1]])
    dx = prev - x
    n_mix = w2.shape[0]
    mix = torch.bmm(h.view(x.shape[0], n_mix, -1).transpose(0, 1), w2)  # [n_mix, N, C]
    return x + dx * (maa[:, None, :] + mix)
