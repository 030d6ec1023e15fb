"""Paged decode attention in plain PyTorch: the reference for `kernels.paged_attention`.

One query token per sequence attends to the keys of its own context, which live in fixed-size pages
of a shared pool: position p of sequence b is at `k_pages[block_tables[b, p // page], p % page]`.
Each sequence is gathered page by page and attended in float32; nothing past `seq_lens[b]` is read,
neither block-table entries nor page slots. Loops over the batch on the host (`seq_lens` is read
with `.tolist()`), so it is neither fast nor capturable in a CUDA graph: it pins down the semantics.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def paged_decode_attention_reference(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_tables: Tensor,
                                     seq_lens: Tensor, scale: float | None = None) -> Tensor:
    """q [B, H, D]; k_pages, v_pages [num_blocks, page_size, H, D]; block_tables [B, max_pages]
    integer; seq_lens [B] integer. out[b, h] = softmax(q[b, h] . K_b[:, h]^T * scale) @ V_b[:, h] over
    the first seq_lens[b] positions (scale defaults to 1/sqrt(D)); a row with seq_len 0 is zeros.
    Returns [B, H, D] in q's dtype, computed in float32."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, D], got {tuple(q.shape)}")
    B, H, D = q.shape
    if k_pages.dim() != 4 or k_pages.shape[2:] != (H, D):
        raise ValueError(f"k_pages must be [num_blocks, page_size, {H}, {D}], got {tuple(k_pages.shape)}")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages must have k_pages' shape {tuple(k_pages.shape)}, got {tuple(v_pages.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(f"block_tables must be [B, max_pages] = [{B}, max_pages], got {tuple(block_tables.shape)}")
    if seq_lens.shape != (B,):
        raise ValueError(f"seq_lens must be [B] = [{B}], got {tuple(seq_lens.shape)}")
    page = k_pages.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = torch.zeros((B, H, D), dtype=q.dtype, device=q.device)
    for b, n in enumerate(seq_lens.tolist()):
        if n <= 0:
            continue
        n_pages = -(-n // page)
        if n_pages > block_tables.shape[1]:
            raise ValueError(f"seq_lens[{b}] = {n} needs {n_pages} pages; block_tables holds {block_tables.shape[1]}")
        blocks = block_tables[b, :n_pages].long()
        k = k_pages[blocks].reshape(n_pages * page, H, D)[:n].float()  # [n, H, D]
        v = v_pages[blocks].reshape(n_pages * page, H, D)[:n].float()
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), v).to(q.dtype)
    return out
