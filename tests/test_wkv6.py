"""The WKV6 reference forms agree: sequential definition, chunked parallel form, one-step form."""
from __future__ import annotations

import pytest
import torch

from kernels.wkv6_reference import wkv6_chunked, wkv6_sequential, wkv6_step


def _inputs(B, T, H, K, seed=0, strong_decay=False):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, K, generator=g) for _ in range(3))
    w_raw = torch.randn(B, T, H, K, generator=g) + (2.5 if strong_decay else -1.0)
    u = torch.randn(H, K, generator=g) * 0.5
    s0 = torch.randn(B, H, K, K, generator=g)
    return r, k, v, -w_raw.exp(), u, s0


@pytest.mark.parametrize("T,chunk", [(1, 16), (15, 16), (16, 16), (50, 16), (64, 32), (37, 7)])
@pytest.mark.parametrize("strong_decay", [False, True])
def test_chunked_equals_sequential(T, chunk, strong_decay):
    r, k, v, w, u, s0 = _inputs(2, T, 3, 8, seed=T, strong_decay=strong_decay)
    y_ref, s_ref = wkv6_sequential(r, k, v, w, u, s0)
    y, s = wkv6_chunked(r, k, v, w, u, s0, chunk_size=chunk)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert torch.allclose(y, y_ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(s, s_ref, atol=1e-4, rtol=1e-4)


def test_step_updates_slots_in_pool_and_matches_sequential():
    r, k, v, w, u, s0 = _inputs(3, 6, 2, 8, seed=5)
    pool = torch.zeros(5, 2, 8, 8)
    slots = torch.tensor([4, 0, 2])
    pool[slots] = s0
    untouched = pool[[1, 3]].clone()
    ys = [wkv6_step(r[:, t], k[:, t], v[:, t], w[:, t], u, pool, slots) for t in range(6)]
    y_ref, s_ref = wkv6_sequential(r, k, v, w, u, s0)
    assert torch.allclose(torch.stack(ys, 1), y_ref, atol=1e-5)
    assert torch.allclose(pool[slots], s_ref, atol=1e-5)
    assert torch.equal(pool[[1, 3]], untouched)


def test_input_checks_name_the_problem():
    r, k, v, w, u, s0 = _inputs(1, 4, 2, 8)
    with pytest.raises(ValueError, match="state"):
        wkv6_chunked(r, k, v, w, u, s0.double())
    with pytest.raises(ValueError, match="u must be"):
        wkv6_sequential(r, k, v, w, u[:1], s0)
