"""The Triton split-key tail attention against its reference (masked SDPA).

Without CUDA the kernels run under Triton's interpreter at tiny shapes (H = 2, D = 16 and 24) in
float32 and float16; with CUDA the same cases run compiled, plus the `gpu` case at the 1.5B shape
(H = 32, D = 64) in bfloat16.
"""
from __future__ import annotations

import pytest
import torch

from triton_interpreter import (CUDA, import_kernels, interpreter_while_testing,  # noqa: F401 (fixture, test)
                                needs_subprocess, test_module_under_interpreter_in_subprocess)

DEVICE = "cuda" if CUDA else "cpu"
IN_SUBPROCESS = needs_subprocess()
(_mod,) = import_kernels(("kernels.tail_attention",), "tail_attention_fwd_kernel", IN_SUBPROCESS)
tail_attention = _mod.tail_attention

from kernels.tail_attention_reference import tail_attention_reference  # noqa: E402


TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _rel(out, ref):
    return ((out.double().cpu() - ref.double().cpu()).abs().max() / ref.double().cpu().abs().max()).item()


def _inputs(Q, n, H, D, dtype, device, seed=0):
    """q as rows of a [Q, H * D] tensor and keys/values as views of one [n, 2, H * D] buffer (the
    strides the engine passes), random positions checked separately."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(Q, H * D, generator=g).to(dtype=dtype, device=device).view(Q, H, D)
    kv = torch.randn(n, 2, H * D, generator=g).to(dtype=dtype, device=device)
    return q, kv[:, 0].view(n, H, D), kv[:, 1].view(n, H, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Q,n,D,splits", [(1, 1, 16, 1), (5, 37, 16, 1), (17, 200, 16, 4), (3, 130, 24, 8),
                                          (17, 70, 16, 16)])  # the last: splits with no keys at all
def test_end_aligned_tail_matches_reference(Q, n, D, splits, dtype):
    H = 2
    q, k, v = _inputs(Q, n, H, D, dtype, DEVICE)
    pos = torch.arange(n - Q, n, device=DEVICE)  # the last Q positions of the sequence
    out = tail_attention(q, k, v, pos, num_splits=splits)
    ref = tail_attention_reference(q.float(), k.float(), v.float(), pos)
    assert out.dtype == dtype and out.shape == (Q, H, D)
    assert _rel(out, ref) < TOL[dtype]


def test_positions_decide_what_each_query_sees():
    """A query at -1 sees nothing (zeros), one past the end sees every key, the rest their prefix."""
    H, D, n = 2, 16, 90
    q, k, v = _inputs(6, n, H, D, torch.float32, DEVICE, seed=3)
    pos = torch.tensor([-1, 0, 10, 63, 64, 500], device=DEVICE)
    out = tail_attention(q, k, v, pos, num_splits=4)
    ref = tail_attention_reference(q, k, v, pos)
    assert torch.equal(out[0].cpu(), torch.zeros(H, D))
    assert _rel(out[1:], ref[1:]) < TOL[torch.float32]
    # query 1 sees key 0 only: its output is value 0
    torch.testing.assert_close(out[1].cpu(), v[0].cpu(), rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_field():
    q, k, v = _inputs(4, 20, 2, 16, torch.float32, DEVICE)
    pos = torch.arange(16, 20, device=DEVICE)
    with pytest.raises(ValueError, match="q_positions"):
        tail_attention(q, k, v, pos[:3])
    with pytest.raises(ValueError, match="heads and head size"):
        tail_attention(q[:, :1], k, v, pos)
    with pytest.raises(ValueError, match="1 to 64 queries"):
        tail_attention(q.new_zeros(65, 2, 16), k, v, torch.arange(65, device=DEVICE))
    with pytest.raises(ValueError, match="one dtype"):
        tail_attention(q, k.half(), v.half(), pos)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n", [4096, 65536])
def test_tail_at_the_1b5_shape_bf16(n):
    Q, H, D = 17, 32, 64
    q, k, v = _inputs(Q, n, H, D, torch.bfloat16, "cuda")
    pos = torch.arange(n - Q, n, device="cuda")
    ref = tail_attention_reference(q.float(), k.float(), v.float(), pos)
    assert _rel(tail_attention(q, k, v, pos), ref) < TOL[torch.bfloat16]
