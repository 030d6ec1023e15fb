"""Plain-PyTorch reference of `kernels.tail_attention`: a few queries of one sequence attending over
its contiguous keys, causally by absolute position (what a prompt's last positions do in the GOLD
layers)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def tail_attention_reference(q: Tensor, keys: Tensor, values: Tensor, q_positions: Tensor,
                             scale: float | None = None) -> Tensor:
    """Same contract as `kernels.tail_attention.tail_attention`."""
    n_k = keys.shape[0]
    # [1, H, n, D]: SDPA's fused kernels take 4-d inputs only (3-d ones fell back to its math path)
    qi, ki, vi = (t.transpose(0, 1)[None] for t in (q, keys, values))
    visible = torch.arange(n_k, device=q.device)[None, :] <= q_positions.to(q.device)[:, None]
    out = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=visible[None, None], scale=scale)
    # a query that sees no key gets zeros (SDPA would give NaN)
    return torch.where(visible.any(-1)[:, None, None], out[0].transpose(0, 1), 0).to(q.dtype)
