"""The Triton GOLD key/value derivation against its PyTorch reference, and the reference against the
model's own `layers.gold_keys_values_rows` (the arithmetic the conformance tests pin).

Without CUDA the kernel runs under Triton's interpreter at tiny shapes (C = 64 to 256, LoRA ranks
12 to 128) in float32 and float16; with CUDA the same cases run compiled, plus the `gpu` case at the
1.5B shape in bfloat16. Pages are NaN-filled first: a row stored to a wrong slot, or a slot that
should stay untouched, shows.
"""
from __future__ import annotations

import pytest
import torch

from triton_interpreter import (CUDA, import_kernels, interpreter_while_testing,  # noqa: F401 (fixture, test)
                                needs_subprocess, test_module_under_interpreter_in_subprocess)

DEVICE = "cuda" if CUDA else "cpu"
IN_SUBPROCESS = needs_subprocess()
(_mod,) = import_kernels(("kernels.gold_kv_derive",), "gold_kv_derive_fwd_kernel", IN_SUBPROCESS)
gold_kv_derive = _mod.gold_kv_derive

from engine import layers as L  # noqa: E402
from kernels.gold_kv_derive_reference import GoldKVDeriveWeights, gold_kv_derive_reference  # noqa: E402


# max |out - ref| / max |ref| (layer-normed outputs, rounded to the dtype)
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _rel(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def _weights(C: int, r: int, R: int, dtype, device, seed: int = 0) -> GoldKVDeriveWeights:
    g = torch.Generator(device="cpu").manual_seed(seed)

    def t(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=g) * scale + offset).to(dtype=dtype, device=device)

    return GoldKVDeriveWeights(maa_v_cache=t(C, scale=0.3, offset=0.5), maa_w1=t(C, 2 * r, scale=C ** -0.5),
                               maa_w2=t(2, r, C, scale=r ** -0.5), maa_k=t(C, scale=0.3, offset=0.5),
                               maa_v=t(C, scale=0.3, offset=0.5), key_w1=t(C, R, scale=C ** -0.5),
                               key_w2=t(R, C, scale=R ** -0.5), value_w1=t(C, R, scale=C ** -0.5),
                               value_w2=t(R, C, scale=R ** -0.5), ln_k_weight=t(C, scale=0.2, offset=1.0),
                               ln_k_bias=t(C, scale=0.1), ln_v_weight=t(C, scale=0.2, offset=1.0),
                               ln_v_bias=t(C, scale=0.1))


def _case(N: int, C: int, dtype, device, n_slots: int, seed: int = 0):
    """Rows of two histories packed (the second starts at row N // 3), each row with its predecessor
    (zeros before a history's start); slots: a shuffled subset of the pages, every third row -1."""
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    proto = torch.randn(N, C, generator=g).to(dtype=dtype, device=device)
    values = torch.randn(N, C, generator=g).to(dtype=dtype, device=device)
    prev_proto, prev_values = L.shift_one(proto), L.shift_one(values)
    if N > 3:
        prev_proto[N // 3] = 0
        prev_values[N // 3] = 0
    slots = torch.randperm(n_slots, generator=g)[:N].to(torch.int64)
    slots[::3] = -1
    return proto, prev_proto, values, prev_values, slots.to(device)


def _pages(n_slots: int, C: int, dtype, device):
    return (torch.full((n_slots, C), float("nan"), dtype=dtype, device=device),
            torch.full((n_slots, C), float("nan"), dtype=dtype, device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,C,r,R", [(1, 64, 32, 64), (17, 64, 32, 64), (40, 128, 32, 64), (33, 128, 32, 128),
                                     (19, 256, 32, 64), (21, 64, 12, 40)])  # the last: ranks padded inside the kernel
def test_kernel_matches_reference(N, C, r, R, dtype):
    w = _weights(C, r, R, dtype, DEVICE)
    proto, prev_proto, values, prev_values, slots = _case(N, C, dtype, DEVICE, n_slots=3 * N + 5)
    kp, vp = _pages(3 * N + 5, C, dtype, DEVICE)
    keys, vals = gold_kv_derive(proto, prev_proto, values, prev_values, w, slots, kp, vp)
    # the reference in float32 from the same inputs: the kernel accumulates in float32
    w32 = GoldKVDeriveWeights(*(t.float() for t in w))
    rkp, rvp = _pages(3 * N + 5, C, torch.float32, DEVICE)
    ref_k, ref_v = gold_kv_derive_reference(proto.float(), prev_proto.float(), values.float(), prev_values.float(),
                                            w32, slots, rkp, rvp)
    assert keys.dtype == vals.dtype == dtype and keys.shape == vals.shape == (N, C)
    assert _rel(keys.cpu(), ref_k.cpu()) < TOL[dtype]
    assert _rel(vals.cpu(), ref_v.cpu()) < TOL[dtype]
    stored = slots >= 0
    # stored rows are exactly the returned ones; every other slot untouched (NaN)
    assert torch.equal(kp[slots[stored]], keys[stored]) and torch.equal(vp[slots[stored]], vals[stored])
    untouched = torch.ones(kp.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[slots[stored]] = False
    assert kp[untouched].isnan().all() and vp[untouched].isnan().all()


def _stack(ws: list[GoldKVDeriveWeights]) -> GoldKVDeriveWeights:
    return GoldKVDeriveWeights(*(torch.stack(ts) for ts in zip(*ws)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,C,R", [(17, 64, 64), (40, 128, 40)])
def test_stacked_layers_equal_one_call_per_layer(N, C, R, dtype):
    """Several layers in one launch (weights [L, ...], pages a [L, S, C] view of a pool shaped as
    the working set's) give each layer exactly what its own call gives, in the layer's pages only."""
    n_layers, page, n_pages = 3, 8, -(-3 * N // 8) + 2
    ws = [_weights(C, 16, R, dtype, DEVICE, seed=i) for i in range(n_layers)]
    proto, prev_proto, values, prev_values, slots = _case(N, C, dtype, DEVICE, n_slots=n_pages * page, seed=7)
    pool_k = torch.full((n_layers, n_pages + 1, page, C), float("nan"), dtype=dtype, device=DEVICE)
    pool_v = torch.full_like(pool_k, float("nan"))
    keys, vals = gold_kv_derive(proto, prev_proto, values, prev_values, _stack(ws), slots,
                                pool_k.view(n_layers, -1, C), pool_v.view(n_layers, -1, C))
    assert keys.shape == vals.shape == (n_layers, N, C)
    for i, w in enumerate(ws):
        kp, vp = _pages((n_pages + 1) * page, C, dtype, DEVICE)
        k1, v1 = gold_kv_derive(proto, prev_proto, values, prev_values, w, slots, kp, vp)
        assert torch.equal(keys[i], k1) and torch.equal(vals[i], v1)
        # the layer's pages hold what the one-layer call stored, the other slots untouched (NaN)
        assert torch.equal(pool_k[i].view(-1, C).nan_to_num(7.), kp.nan_to_num(7.))
        assert torch.equal(pool_v[i].view(-1, C).nan_to_num(7.), vp.nan_to_num(7.))
    ref_pages = [torch.zeros(n_layers, (n_pages + 1) * page, C, dtype=dtype, device=DEVICE) for _ in range(2)]
    ref_k, ref_v = gold_kv_derive_reference(proto, prev_proto, values, prev_values, _stack(ws), slots, *ref_pages)
    assert ref_k.shape == ref_v.shape == (n_layers, N, C)
    assert _rel(keys.cpu().float(), ref_k.cpu().float()) < TOL[dtype]
    assert _rel(vals.cpu().float(), ref_v.cpu().float()) < TOL[dtype]


def test_reference_is_the_models_arithmetic():
    """The reference equals `layers.gold_keys_values_rows` on the same rows (float32, CPU)."""
    C, N = 64, 9
    w = _weights(C, 32, 64, torch.float32, "cpu", seed=3)
    lw = L.LayerWeights({"b.att.time_maa_v_cache": w.maa_v_cache, "b.att.time_maa_kv_w1": w.maa_w1,
                         "b.att.time_maa_kv_w2": w.maa_w2, "b.att.time_maa_k": w.maa_k, "b.att.time_maa_v": w.maa_v,
                         "b.att.time_key_w1": w.key_w1, "b.att.time_key_w2": w.key_w2,
                         "b.att.time_value_w1": w.value_w1, "b.att.time_value_w2": w.value_w2,
                         "b.att.ln_k.weight": w.ln_k_weight, "b.att.ln_k.bias": w.ln_k_bias,
                         "b.att.ln_v.weight": w.ln_v_weight, "b.att.ln_v.bias": w.ln_v_bias}, "b.")
    proto, prev_proto, values, prev_values, slots = _case(N, C, torch.float32, "cpu", n_slots=40, seed=5)
    kp, vp = _pages(40, C, torch.float32, "cpu")
    ref_k, ref_v = gold_kv_derive_reference(proto, prev_proto, values, prev_values, w, slots, kp, vp)
    model_k, model_v = L.gold_keys_values_rows(proto, prev_proto, values, prev_values, lw)
    torch.testing.assert_close(ref_k, model_k, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ref_v, model_v, rtol=1e-6, atol=1e-6)


def test_bad_inputs_name_the_field():
    C = 64
    w = _weights(C, 32, 64, torch.float32, DEVICE)
    proto, prev_proto, values, prev_values, slots = _case(8, C, torch.float32, DEVICE, n_slots=30)
    kp, vp = _pages(30, C, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="prev_token_values"):
        gold_kv_derive(proto, prev_proto, values, prev_values[:5], w, slots, kp, vp)
    with pytest.raises(ValueError, match="row_slots"):
        gold_kv_derive(proto, prev_proto, values, prev_values, w, slots.int(), kp, vp)
    with pytest.raises(ValueError, match="weights.key_w2"):
        gold_kv_derive(proto, prev_proto, values, prev_values, w._replace(key_w2=w.key_w2[:, :32]), slots, kp, vp)
    with pytest.raises(ValueError, match="value_pages"):
        gold_kv_derive(proto, prev_proto, values, prev_values, w, slots, kp, vp[:, :32])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_stacked_layers_at_the_1b5_shape_bf16():
    C, n_layers, N = 2048, 8, 4096
    ws = [_weights(C, 32, 128, torch.bfloat16, "cuda", seed=i) for i in range(n_layers)]
    proto, prev_proto, values, prev_values, slots = _case(N, C, torch.bfloat16, "cuda", n_slots=N + 100)
    pool_k, pool_v = (torch.full((n_layers, N + 100, C), float("nan"), dtype=torch.bfloat16, device="cuda")
                      for _ in range(2))
    keys, vals = gold_kv_derive(proto, prev_proto, values, prev_values, _stack(ws), slots, pool_k, pool_v)
    for i in (0, 5, 7):
        kp, vp = _pages(N + 100, C, torch.bfloat16, "cuda")
        k1, v1 = gold_kv_derive(proto, prev_proto, values, prev_values, ws[i], slots, kp, vp)
        assert torch.equal(keys[i], k1) and torch.equal(vals[i], v1)
        assert torch.equal(pool_k[i].nan_to_num(7.), kp.nan_to_num(7.))
        assert torch.equal(pool_v[i].nan_to_num(7.), vp.nan_to_num(7.))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("N", [1000, 40000])  # both tile choices (`gold_kv_derive.LONG_ROWS`)
def test_kernel_at_the_1b5_shape_bf16(N):
    C, R = 2048, 128
    w = _weights(C, 32, R, torch.bfloat16, "cuda")
    proto, prev_proto, values, prev_values, slots = _case(N, C, torch.bfloat16, "cuda", n_slots=N + 100)
    kp, vp = _pages(N + 100, C, torch.bfloat16, "cuda")
    keys, vals = gold_kv_derive(proto, prev_proto, values, prev_values, w, slots, kp, vp)
    w32 = GoldKVDeriveWeights(*(t.float() for t in w))
    rkp, rvp = _pages(N + 100, C, torch.float32, "cuda")
    ref_k, ref_v = gold_kv_derive_reference(proto.float(), prev_proto.float(), values.float(), prev_values.float(),
                                            w32, slots, rkp, rvp)
    assert _rel(keys, ref_k) < TOL[torch.bfloat16] and _rel(vals, ref_v) < TOL[torch.bfloat16]
    stored = slots >= 0
    assert torch.equal(kp[slots[stored]], keys[stored]) and torch.equal(vp[slots[stored]], vals[stored])
