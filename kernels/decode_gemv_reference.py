"""Contract of `kernels.decode_gemv` and `kernels.decode_norm_mix`: a decode step's skinny products
and the norms and mixes before them.

Products. One weight W [N, K] (row n is output column n) is read by a few input rows. Its columns
fall into segments (`ColumnSegments`); each segment is read by one or two input groups of B rows
(group g's rows are g*B .. g*B + B - 1), and its outputs land in the same rows of `out`:

    out[g*B + b, n] = epilogue(x[g*B + b] . W[n])   for the groups g of n's segment

The product is rounded to out's dtype, then the epilogue (float32, one rounding at the store):
none; tanh; relu_square (relu(.)^2 on columns < act_cols, identity beyond); residual
(residual[r] + product); gated_residual (residual[r] + sigmoid(gate[r]) * product).

Norms and mixes. base = layer_norm(x + addend) * weight + bias in float32, rounded to x's dtype (the
sum rounded first, as a PyTorch add stores it); ln_out[b] = base[b]; for each mix vector g,
out[g*B + b] = base[b] + (prev[b] - base[b]) * mix[g], in float32 and rounded once; and a LoRA's
first stage lora_out[b] = tanh(out[b] . lora_w1t[j]) (the product rounded, then tanh, rounded).

Rounding points are those of the PyTorch ops they replace, so the fused decode step differs from
the plain one only by the order of the float32 accumulation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("none", "tanh", "relu_square", "residual", "gated_residual")


@dataclass(frozen=True)
class ColumnSegments:
    """Which input groups read which columns: `ends` are increasing column ends (the last is N);
    segment i spans [ends[i-1], ends[i]) and is read by groups[i] (one or two group indices)."""

    ends: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.ends) != len(self.groups) or not self.ends:
            raise ValueError(f"segments: {len(self.ends)} ends for {len(self.groups)} group lists")
        if any(b <= a for a, b in zip((0,) + self.ends, self.ends)):
            raise ValueError(f"segments: ends must increase from above 0, got {self.ends}")
        if any(not 1 <= len(g) <= 2 or min(g) < 0 for g in self.groups):
            raise ValueError(f"segments: each segment is read by one or two groups >= 0, got {self.groups}")

    @property
    def n_groups(self) -> int:
        return max(max(g) for g in self.groups) + 1

    def spans(self):
        """(start, end, groups) of every segment."""
        return zip((0,) + self.ends[:-1], self.ends, self.groups)


ONE_GROUP = None  # `segments=None`: every column is read by group 0


def decode_gemv_reference(x: Tensor, weight: Tensor, out: Tensor, batch: int, segments: ColumnSegments | None = None,
                          activation: str = "none", act_cols: int = 0, residual: Tensor | None = None,
                          gate: Tensor | None = None) -> Tensor:
    """Writes `out` as the module docstring says and returns it. Rows of `out` that no segment's
    groups cover are left as they were."""
    B = batch
    segments = segments or ColumnSegments((weight.shape[0],), ((0,),))
    for start, end, groups in segments.spans():
        for g in groups:
            rows = slice(g * B, (g + 1) * B)
            product = (x[rows].float() @ weight[start:end].float().T).to(out.dtype).float()
            out[rows, start:end] = _epilogue(product, activation, start, end, act_cols,
                                             None if residual is None else residual[rows, start:end],
                                             None if gate is None else gate[rows, start:end]).to(out.dtype)
    return out


def decode_norm_mix_reference(x: Tensor, ln: tuple[Tensor, Tensor, float], ln_out: Tensor | None = None,
                              prev: Tensor | None = None, mix: Tensor | None = None, out: Tensor | None = None,
                              addend: Tensor | None = None, lora_w1t: Tensor | None = None,
                              lora_out: Tensor | None = None) -> None:
    """Writes ln_out [B, K], out [G*B, K] (mix [G, K], prev [B, K]) and lora_out [B, R] =
    tanh(mixed rows of mix 0 @ lora_w1t.T) (the product rounded first) as the module docstring says."""
    if addend is not None:
        x = x + addend
    base = F.layer_norm(x.float(), (x.shape[-1],), ln[0].float(), ln[1].float(), ln[2]).to(x.dtype)
    if ln_out is not None:
        ln_out.copy_(base)
    if mix is not None:
        base32, dx, B = base.float(), prev.float() - base.float(), x.shape[0]
        mixed = torch.cat([(base32 + dx * mix[g].float()).to(x.dtype) for g in range(mix.shape[0])])
        if out is not None:
            out.copy_(mixed)
        if lora_w1t is not None:
            lora_out.copy_(torch.tanh((mixed[:B].float() @ lora_w1t.float().T).to(x.dtype).float()))


def _epilogue(p: Tensor, activation: str, start: int, end: int, act_cols: int, residual, gate) -> Tensor:
    if activation == "tanh":
        return torch.tanh(p)
    if activation == "relu_square":
        cols = torch.arange(start, end, device=p.device)
        return torch.where(cols < act_cols, torch.relu(p) ** 2, p)
    if activation == "residual":
        return residual.float() + p
    if activation == "gated_residual":
        return residual.float() + torch.sigmoid(gate.float()) * p
    return p
