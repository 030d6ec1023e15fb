"""The fused Finch-C2 decode step (`kernels.finch_wkv_decode`) against its reference, and the
reference against the unfused ops it replaces.

Without CUDA the kernel runs under Triton's interpreter at tiny shapes (2-4 heads of 16, LoRA ranks
8 and 12) in float32 and float16, with and without v2 and the key scaling; states are checked in
their slots and untouched elsewhere. With CUDA the same run compiled, plus the 1.5B shape in bf16.
"""
from __future__ import annotations

import pytest
import torch

from triton_interpreter import (CUDA, import_kernels, interpreter_while_testing,  # noqa: F401 (fixture, test)
                                needs_subprocess, test_module_under_interpreter_in_subprocess)

DEVICE = "cuda" if CUDA else "cpu"
IN_SUBPROCESS = needs_subprocess()
(_mod,) = import_kernels(("kernels.finch_wkv_decode",), "finch_wkv_decode_fwd_kernel", IN_SUBPROCESS)
finch_wkv_decode = _mod.finch_wkv_decode

from kernels.finch_wkv_decode_reference import finch_wkv_decode_reference  # noqa: E402
from kernels.wkv6_reference import wkv6_step  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _inputs(N, H, K, R_w, R_v, dtype, device, v2: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = H * K
    t = lambda *shape, scale=1.0, offset=0.0: (torch.randn(*shape, generator=g) * scale + offset)  # noqa: E731
    buf = t(N, 5 * A + 7)  # r, k, v, v2 as column blocks of one wider buffer, as the decode step has them
    cast = lambda x: x.to(dtype).to(device)  # noqa: E731
    rows = cast(buf)
    args = dict(r=rows[:, :A], k=rows[:, A:2 * A], v=rows[:, 2 * A:3 * A], decay_hidden=cast(t(N, R_w)),
                time_decay=cast(t(A, scale=0.5, offset=-2.0)), decay_w2=cast(t(R_w, A, scale=R_w ** -0.5)),
                u=cast(t(H, K, scale=0.3)))
    if v2:
        args.update(v2=rows[:, 3 * A:4 * A], value2_hidden=cast(t(N, R_v)),
                    value2_w2=cast(t(R_v, A, scale=R_v ** -0.5)))
    return args


def _pool(S, H, K, seed):
    return (torch.randn(S, H, K, K, generator=torch.Generator().manual_seed(seed)) * 0.5).to(DEVICE)


@pytest.mark.parametrize("v2,one_minus_w", [(True, True), (False, True), (True, False)], ids=["c2", "no-v2", "no-1-w"])
@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fused_step_matches_the_reference(dtype, N, v2, one_minus_w):
    H, K = 2 if N == 3 else 4, 16
    args = _inputs(N, H, K, 8, 12, dtype, DEVICE, v2, seed=N)
    slots = torch.tensor([5, 0, 3][:N], device=DEVICE)
    pool, pool_ref = _pool(7, H, K, N), _pool(7, H, K, N)
    before = pool.clone()
    out = finch_wkv_decode(state_pool=pool, slots=slots, use_one_minus_w=one_minus_w, **args)
    ref = finch_wkv_decode_reference(state_pool=pool_ref, slots=slots, use_one_minus_w=one_minus_w, **args)
    assert out.shape == (N, H * K) and out.dtype == dtype
    scale = ref.double().abs().max().item()
    assert (out.double() - ref.double()).abs().max().item() / scale < TOL[dtype]
    assert (pool - pool_ref).abs().max().item() < 1e-5 * pool_ref.abs().max().item() + TOL[dtype]
    untouched = [s for s in range(7) if s not in slots.tolist()]
    assert torch.equal(pool[untouched], before[untouched]) and not torch.equal(pool[slots], before[slots])


def test_reference_is_the_unfused_arithmetic():
    """decay LoRA, key scaling, `wkv6_step` and the v2 add written out op by op."""
    N, H, K = 2, 2, 16
    a = _inputs(N, H, K, 8, 8, torch.float32, "cpu", True, seed=9)
    slots = torch.tensor([1, 0])
    pool, pool_ref = _pool(3, H, K, 1).cpu(), _pool(3, H, K, 1).cpu()
    out = finch_wkv_decode_reference(state_pool=pool, slots=slots, use_one_minus_w=True, **a)
    log_decay = -(a["time_decay"] + torch.tanh(a["decay_hidden"]) @ a["decay_w2"]).exp()
    k = a["k"] * (1 - log_decay.exp())
    y = wkv6_step(*(t.reshape(N, H, K) for t in (a["r"], k, a["v"], log_decay)), a["u"], pool_ref, slots)
    want = y.reshape(N, -1) + a["v2"] + torch.tanh(a["value2_hidden"]) @ a["value2_w2"]
    assert (out - want).abs().max().item() < 1e-6 and torch.equal(pool, pool_ref)


def test_bad_inputs_name_the_field():
    args = _inputs(2, 2, 16, 8, 8, torch.float32, DEVICE, True)
    pool, slots = _pool(3, 2, 16, 0), torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(ValueError, match="k: expected"):
        finch_wkv_decode(**{**args, "k": args["k"].contiguous()}, state_pool=pool, slots=slots, use_one_minus_w=True)
    with pytest.raises(ValueError, match="slots: expected"):
        finch_wkv_decode(**args, state_pool=pool, slots=slots[:1], use_one_minus_w=True)
    with pytest.raises(ValueError, match="v2, value2_hidden and value2_w2"):
        finch_wkv_decode(**{**args, "v2": None}, state_pool=pool, slots=slots, use_one_minus_w=True)
    with pytest.raises(ValueError, match="state_pool: expected float32"):
        finch_wkv_decode(**args, state_pool=pool.half(), slots=slots, use_one_minus_w=True)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1, 16])
def test_fused_step_at_the_1b5_shape_bf16(N):
    args = _inputs(N, 32, 64, 64, 64, torch.bfloat16, "cuda", True, seed=N)
    slots = torch.arange(N, device="cuda") * 2
    pool, pool_ref = _pool(2 * N, 32, 64, N), _pool(2 * N, 32, 64, N)
    out = finch_wkv_decode(state_pool=pool, slots=slots, use_one_minus_w=True, **args)
    ref = finch_wkv_decode_reference(state_pool=pool_ref, slots=slots, use_one_minus_w=True, **args)
    assert (out.double() - ref.double()).abs().max().item() / ref.double().abs().max().item() < TOL[torch.bfloat16]
    assert (pool - pool_ref).abs().max().item() < 1e-2
