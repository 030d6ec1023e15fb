"""The Triton WKV6 kernels (decode in place, packed varlen prefill) against a float64 recurrence.

Without CUDA the kernels run under Triton's interpreter at tiny shapes (H=2, K=V=16/32): the
variable is set while Triton and the kernel modules are imported (Triton decides at decoration time)
and during each test of this module, and restored otherwise, so other tests never see it. With CUDA the same cases run compiled,
plus the `gpu` cases at the 1.5B shape (H=32, K=V=64) in bfloat16.
"""
from __future__ import annotations

import pytest
import torch

from triton_interpreter import (CUDA, import_kernels, interpreter_while_testing,  # noqa: F401 (fixture, test)
                                needs_subprocess, test_module_under_interpreter_in_subprocess)

DEVICE = "cuda" if CUDA else "cpu"
_KERNEL_MODULES = ("kernels.wkv6_decode", "kernels.wkv6_prefill")


# Triton imported earlier in this process without the interpreter cannot be switched to it: then
# the module runs itself in a subprocess instead (tests/triton_interpreter.py)
IN_SUBPROCESS = needs_subprocess()


_decode_mod, _prefill_mod = import_kernels(_KERNEL_MODULES, "wkv6_decode_fwd_kernel", IN_SUBPROCESS)
wkv6_decode, wkv6_prefill = _decode_mod.wkv6_decode, _prefill_mod.wkv6_prefill

from kernels import dispatch  # noqa: E402
from kernels.wkv6_reference import wkv6_chunked, wkv6_step  # noqa: E402


# error budgets, as max |out - ref| / max |ref| per tensor (outputs are rounded to their dtype)
TOL_Y = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
TOL_STATE = {torch.float32: 2e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _sequential64(r, k, v, w, u, s0):
    """The recurrence token by token in float64: r, k, w [T, H, K], v [T, H, V], s0 [H, K, V]."""
    r, k, v, w, u, S = (x.double() for x in (r, k, v, w, u, s0))
    ys = []
    for t in range(r.shape[0]):
        kv = k[t, :, :, None] * v[t, :, None, :]
        ys.append(torch.einsum("hk,hkv->hv", r[t], S + u[:, :, None] * kv))
        S = w[t].exp()[:, :, None] * S + kv
    return (torch.stack(ys) if ys else v.new_zeros(v.shape)), S


def _inputs(T, H, K, V, dtype, seed, decay="normal", u_zero=False, num_slots=8):
    g = torch.Generator().manual_seed(seed)
    r, k = (torch.randn(T, H, K, generator=g) for _ in range(2))
    v = torch.randn(T, H, V, generator=g)
    shift = {"normal": -1.0, "strong": 2.5, "mixed": 0.0}[decay]
    w_raw = torch.randn(T, H, K, generator=g) * (3.0 if decay == "mixed" else 1.0) + shift
    w = -w_raw.exp()
    u = torch.zeros(H, K) if u_zero else torch.randn(H, K, generator=g) * 0.5
    pool = torch.randn(num_slots, H, K, V, generator=g)
    to = lambda x: x.to(DEVICE, dtype)  # noqa: E731
    return to(r), to(k), to(v), to(w), to(u), pool.to(DEVICE)


def _rel(out, ref):
    return ((out.double().cpu() - ref.double().cpu()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def _check_prefill(lens, slots, H, K, V, dtype, seed, decay="normal", u_zero=False, tuning=None):
    T = sum(lens)
    r, k, v, w, u, pool = _inputs(T, H, K, V, dtype, seed, decay, u_zero, num_slots=max(8, max(slots) + 2))
    pool0 = pool.clone()
    slots_t = torch.tensor(slots, device=DEVICE)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    y = wkv6_prefill(r, k, v, w, u, torch.tensor(cu), pool, slots_t, *([tuning] if tuning else []))
    assert y.dtype == dtype and y.shape == (T, H, V)
    assert torch.isfinite(y).all() and torch.isfinite(pool).all()
    for b, n in enumerate(lens):
        sl = slice(cu[b], cu[b + 1])
        y_ref, s_ref = _sequential64(r[sl], k[sl], v[sl], w[sl], u, pool0[slots[b]])
        if n:
            assert _rel(y[sl], y_ref) < TOL_Y[dtype], f"y of sequence {b} (length {n})"
        assert _rel(pool[slots[b]], s_ref) < TOL_STATE[dtype], f"final state of sequence {b} (length {n})"
    others = [s for s in range(pool.shape[0]) if s not in slots]
    assert torch.equal(pool[others], pool0[others]), "slots outside the batch were written"


# ---- prefill: packed variable-length sequences ------------------------------------------------
PREFILL_CASES = [
    # lens, slots, dtype, decay, u_zero
    pytest.param([1, 3, 16, 37, 70], [5, 0, 3, 7, 2], torch.float32, "normal", False, id="packed-5"),
    pytest.param([64, 1, 65, 1], [1, 6, 0, 4], torch.float32, "strong", False, id="with-len1-strong"),
    pytest.param([16, 3], [3, 0], torch.float32, "normal", True, id="u-zero"),
    pytest.param([20, 0, 48], [7, 1, 5], torch.float32, "mixed", False, id="empty-seq-mixed"),
    pytest.param([3, 70], [5, 0], torch.float16, "normal", False, id="fp16-packed"),
    pytest.param([33], [4], torch.float16, "strong", True, id="fp16-strong-u0"),
    pytest.param([260], [6], torch.float32, "mixed", False, id="five-chunks"),
]


@pytest.mark.parametrize("lens,slots,dtype,decay,u_zero", PREFILL_CASES)
def test_prefill_matches_recurrence(lens, slots, dtype, decay, u_zero):
    _check_prefill(lens, slots, 2, 16, 16, dtype, seed=sum(lens), decay=decay, u_zero=u_zero)


# every launch choice computes the same thing (up to rounding): diagonal blocks row by row (the
# default) or as [t, s, channels] tiles (running products of exp(w) or exponentials of sums, several
# channel widths), other warp counts, the row walk as a loop, a cap on the output kernel's registers
CUBE = dict(diag_walk=False)
TUNINGS = [CUBE, dict(CUBE, diag_products=False), dict(CUBE, diag_channels=4),
           dict(CUBE, diag_channels=8, diag_products=False), dict(num_warps=4, chunk_warps=8),
           dict(diag_unroll=False), dict(diag_unroll=False, max_registers=168)]


@pytest.mark.parametrize("tuning", TUNINGS, ids=str)
@pytest.mark.parametrize("case", [0, 1, 4, 6])
def test_prefill_tunings_match_recurrence(case, tuning):
    lens, slots, dtype, decay, u_zero = PREFILL_CASES[case].values
    _check_prefill(lens, slots, 2, 16, 16, dtype, seed=sum(lens), decay=decay, u_zero=u_zero,
                   tuning=_prefill_mod.PrefillTuning(**tuning))


def test_prefill_wider_head():
    _check_prefill([5, 40], [0, 3], 2, 32, 32, torch.float32, seed=11)


def test_prefill_then_decode_continues_the_sequences():
    """A prompt through the prefill kernel, then tokens through the decode kernel, equals the
    recurrence over the whole sequence."""
    H, K, lens, slots = 2, 16, [19, 4], [6, 1]
    steps = 3
    T = sum(lens) + steps * len(lens)
    r, k, v, w, u, pool = _inputs(T, H, K, K, torch.float32, seed=3)
    pool0 = pool.clone()
    slots_t = torch.tensor(slots, device=DEVICE)
    idx = [list(range(0, 19)), list(range(19, 23))]
    base = sum(lens)
    for t in range(steps):
        for b in range(2):
            idx[b].append(base + 2 * t + b)
    wkv6_prefill(r[:base], k[:base], v[:base], w[:base], u, [0, 19, 23], pool, slots_t)
    ys = [wkv6_decode(r[base + 2 * t: base + 2 * t + 2], k[base + 2 * t: base + 2 * t + 2],
                      v[base + 2 * t: base + 2 * t + 2], w[base + 2 * t: base + 2 * t + 2], u, pool, slots_t)
          for t in range(steps)]
    for b in range(2):
        ix = torch.tensor(idx[b], device=DEVICE)
        y_ref, s_ref = _sequential64(r[ix], k[ix], v[ix], w[ix], u, pool0[slots[b]])
        assert _rel(torch.stack([y[b] for y in ys]), y_ref[-steps:]) < TOL_Y[torch.float32]
        assert _rel(pool[slots[b]], s_ref) < TOL_STATE[torch.float32]


# ---- prefill through a ChunkPlan: the length on the device, rows after it padding ---------------
def _check_plan(rows, lengths, H, K, dtype, seed, graph=False):
    """One plan reused for several lengths (as the prefill graphs do), each a fresh sequence from
    slot 3: y up to the length is the recurrence's and zero after, the state is the recurrence's
    at the length, other slots untouched. With `graph`, the launches are captured once and replayed."""
    from kernels.wkv6_plan import ChunkPlan

    r, k, v, w, u, pool = _inputs(rows, H, K, K, dtype, seed, decay="mixed")
    plan = ChunkPlan.one_sequence(rows, DEVICE)
    slots = torch.tensor([3], device=DEVICE)
    pool0 = pool.clone()
    if graph:
        plan.set_length(rows)
        for _ in range(2):  # compiles, outside the capture
            wkv6_prefill(r, k, v, w, u, plan, pool, slots)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y_static = wkv6_prefill(r, k, v, w, u, plan, pool, slots)
    for n in lengths:
        pool.copy_(pool0)
        plan.set_length(n)
        if graph:
            g.replay()
            y = y_static.clone()
        else:
            y = wkv6_prefill(r, k, v, w, u, plan, pool, slots)
        y_ref, s_ref = _sequential64(r[:n], k[:n], v[:n], w[:n], u, pool0[3])
        assert _rel(y[:n], y_ref) < TOL_Y[dtype], f"y at length {n}"
        assert torch.count_nonzero(y[n:]) == 0, f"padded rows after length {n}"
        assert _rel(pool[3], s_ref) < TOL_STATE[dtype], f"state at length {n}"
        others = [s for s in range(pool.shape[0]) if s != 3]
        assert torch.equal(pool[others], pool0[others])


@pytest.mark.parametrize("rows,lengths", [(64, [64, 1, 17]), (130, [130, 128, 64, 65, 3])], ids=str)
def test_prefill_plan_with_the_length_on_the_device(rows, lengths):
    _check_plan(rows, lengths, 2, 16, torch.float32, seed=rows)


def test_prefill_plan_checks_its_shapes():
    from kernels.wkv6_plan import ChunkPlan

    r, k, v, w, u, pool = _inputs(64, 2, 16, 16, torch.float32, 0)
    with pytest.raises(ValueError, match="plan: for 128 rows"):
        wkv6_prefill(r, k, v, w, u, ChunkPlan.one_sequence(128, DEVICE), pool, torch.tensor([0], device=DEVICE))
    with pytest.raises(ValueError, match="length: must be in"):
        ChunkPlan.one_sequence(64, DEVICE).set_length(65)


# ---- decode: one token per sequence, states in place --------------------------------------------
DECODE_CASES = [
    # slots, dtype, decay, u_zero, K
    pytest.param([5, 0, 3], torch.float32, "normal", False, 16, id="slots-503"),
    pytest.param([0], torch.float32, "strong", False, 16, id="batch1-strong"),
    pytest.param([7, 6, 5, 4, 3, 2, 1, 0], torch.float32, "mixed", True, 16, id="reversed-u0"),
    pytest.param([2, 5], torch.float16, "normal", False, 16, id="fp16"),
    pytest.param([1, 4, 6], torch.float32, "normal", False, 32, id="K32"),
]


@pytest.mark.parametrize("slots,dtype,decay,u_zero,K", DECODE_CASES)
def test_decode_matches_reference_step(slots, dtype, decay, u_zero, K):
    H, N = 2, len(slots)
    r, k, v, w, u, pool = _inputs(N, H, K, K, dtype, seed=N + K, decay=decay, u_zero=u_zero)
    pool0, pool_ref = pool.clone(), pool.clone()
    slots_t = torch.tensor(slots, device=DEVICE)
    y = wkv6_decode(r, k, v, w, u, pool, slots_t)
    y_ref = wkv6_step(r, k, v, w, u, pool_ref, slots_t)
    assert y.dtype == dtype and y.shape == (N, H, K)
    for n, s in enumerate(slots):
        y64, s64 = _sequential64(r[n:n + 1], k[n:n + 1], v[n:n + 1], w[n:n + 1], u, pool0[s])
        assert _rel(y[n], y64[0]) < TOL_Y[dtype]
        assert _rel(pool[s], s64) < TOL_STATE[dtype]
    assert _rel(y, y_ref) < TOL_Y[dtype]
    assert torch.allclose(pool, pool_ref, atol=1e-5, rtol=1e-5)
    others = [s for s in range(pool.shape[0]) if s not in slots]
    assert torch.equal(pool[others], pool0[others])


def test_decode_steps_accumulate_like_the_recurrence():
    H, K, slots, steps = 2, 16, [3, 0], 4
    r, k, v, w, u, pool = _inputs(steps * 2, H, K, K, torch.float32, seed=9)
    pool0 = pool.clone()
    slots_t = torch.tensor(slots, device=DEVICE)
    ys = [wkv6_decode(r[2 * t:2 * t + 2], k[2 * t:2 * t + 2], v[2 * t:2 * t + 2], w[2 * t:2 * t + 2], u,
                      pool, slots_t) for t in range(steps)]
    for b, s in enumerate(slots):
        sl = slice(b, None, 2)
        y_ref, s_ref = _sequential64(r[sl], k[sl], v[sl], w[sl], u, pool0[s])
        assert _rel(torch.stack([y[b] for y in ys]), y_ref) < TOL_Y[torch.float32]
        assert _rel(pool[s], s_ref) < TOL_STATE[torch.float32]
    assert torch.equal(pool[[1, 2, 4, 5, 6, 7]], pool0[[1, 2, 4, 5, 6, 7]])


# ---- input checks ------------------------------------------------------------------------------
def test_input_checks_name_the_problem():
    r, k, v, w, u, pool = _inputs(4, 2, 16, 16, torch.float32, seed=0)
    slots = torch.tensor([0, 1, 2, 3], device=DEVICE)
    with pytest.raises(ValueError, match="state_pool"):
        wkv6_decode(r, k, v, w, u, pool.double(), slots)
    with pytest.raises(ValueError, match="slots"):
        wkv6_decode(r, k, v, w, u, pool, slots[:2])
    with pytest.raises(ValueError, match="u must be"):
        wkv6_decode(r, k, v, w, u[:1], pool, slots)
    with pytest.raises(ValueError, match="cu_seqlens"):
        wkv6_prefill(r, k, v, w, u, [0, 3], pool, slots[:1])
    with pytest.raises(ValueError, match="cu_seqlens"):
        wkv6_prefill(r, k, v, w, u, [0, 3, 2, 4], pool, slots[:3])
    with pytest.raises(ValueError, match="slots"):
        wkv6_prefill(r, k, v, w, u, [0, 1, 4], pool, slots[:3])


# ---- dispatch ----------------------------------------------------------------------------------
def test_dispatch_keeps_the_reference_on_cpu(monkeypatch):
    """On CPU tensors both entry points are the reference forms, bit for bit."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    H, K, lens, slots = 2, 8, [5, 1, 9], [4, 0, 2]
    r, k, v, w, u, pool = (t.cpu() for t in _inputs(sum(lens), H, K, K, torch.float32, seed=1))
    pool_ref = pool.clone()
    slots_t = torch.tensor(slots)
    y = dispatch.wkv_prefill(r, k, v, w, u, [0, 5, 6, 15], pool, slots_t)
    for b, (a, e) in enumerate([(0, 5), (5, 6), (6, 15)]):
        y_ref, s_ref = wkv6_chunked(r[a:e][None], k[a:e][None], v[a:e][None], w[a:e][None], u, pool_ref[slots[b]][None])
        pool_ref[slots[b]] = s_ref[0]
        assert torch.equal(y[a:e], y_ref[0])
    assert torch.equal(pool, pool_ref)
    y = dispatch.wkv_decode(r[:3], k[:3], v[:3], w[:3], u, pool, slots_t)
    assert torch.equal(y, wkv6_step(r[:3], k[:3], v[:3], w[:3], u, pool_ref, slots_t))
    assert torch.equal(pool, pool_ref)


def test_dispatch_choice(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert not dispatch.use_triton(cpu)
    if CUDA:
        assert dispatch.use_triton(cpu.cuda())
        monkeypatch.setenv(dispatch.ENV_VAR, "reference")
        assert not dispatch.use_triton(cpu.cuda())


# ---- GPU: the 1.5B shape (H=32, K=V=64) ---------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("decay", ["normal", "strong"])
def test_gpu_prefill_real_shape(dtype, decay):
    _check_prefill([1, 17, 64, 300, 1000, 2], [9, 3, 0, 12, 5, 7], 32, 64, 64, dtype, seed=7, decay=decay)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tuning", [CUBE, dict(CUBE, diag_products=False), dict(CUBE, diag_channels=8, diag_products=False),
                                    dict(precision="tf32x3"), dict(num_warps=4, chunk_warps=8),
                                    dict(diag_unroll=False), dict(max_registers=168),
                                    dict(diag_unroll=False, max_registers=168)], ids=str)
def test_gpu_prefill_tunings_real_shape(dtype, tuning):
    """The other launch choices (the default walks the diagonal blocks row by row with one warp a
    program, one tf32 pass for 16-bit inputs and three for float32)."""
    _check_prefill([1, 17, 64, 300, 1000, 2], [9, 3, 0, 12, 5, 7], 32, 64, 64, dtype, seed=7, decay="strong",
                   tuning=_prefill_mod.PrefillTuning(**tuning))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_prefill_plan_replayed_from_a_graph(dtype):
    """Captured once at 2,048 rows, replayed at other lengths set on the device."""
    _check_plan(2048, [2048, 1, 700, 1024, 1025, 2047], 32, 64, dtype, seed=9, graph=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch", [1, 64, 256])
def test_gpu_decode_real_shape(dtype, batch):
    H, K = 32, 64
    r, k, v, w, u, pool = _inputs(batch, H, K, K, dtype, seed=batch, num_slots=batch + 8)
    slots = torch.randperm(batch + 8, generator=torch.Generator().manual_seed(0))[:batch].to(DEVICE)
    pool_ref = pool.clone()
    y = wkv6_decode(r, k, v, w, u, pool, slots)
    y_ref = wkv6_step(r, k, v, w, u, pool_ref, slots)
    assert _rel(y.float(), y_ref.float()) < TOL_Y[dtype]
    assert _rel(pool, pool_ref) < 1e-6


@pytest.mark.gpu
def test_gpu_model_path_uses_the_kernels_consistently(monkeypatch):
    """The dispatcher's CUDA path agrees with its reference path on one mixed batch."""
    H, K, lens, slots = 32, 64, [1, 200, 1, 77], [3, 0, 9, 4]
    r, k, v, w, u, pool = _inputs(sum(lens), H, K, K, torch.bfloat16, seed=5, num_slots=12)
    pool_ref = pool.clone()
    cu = [0, 1, 201, 202, 279]
    slots_t = torch.tensor(slots, device=DEVICE)
    y = dispatch.wkv_prefill(r, k, v, w, u, cu, pool, slots_t)
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    y_ref = dispatch.wkv_prefill(r, k, v, w, u, cu, pool_ref, slots_t)
    assert _rel(y.float(), y_ref.float()) < TOL_Y[torch.bfloat16]
    assert _rel(pool, pool_ref) < TOL_STATE[torch.bfloat16]


# ---- GPU: the model on CUDA (kernels through `_wkv`) against the reference logits ---------------
def _cases():
    from conftest import conformance_cases

    return conformance_cases() or [pytest.param(None, marks=pytest.mark.skip("no conformance cases"))]


@pytest.mark.gpu
@pytest.mark.parametrize("case", _cases())
def test_gpu_model_matches_golden_logits(case):
    import numpy as np

    from conftest import CONFORMANCE_DIR, load_model
    from engine.model import StepBatch

    g = dict(np.load(CONFORMANCE_DIR / case / "golden.npz"))
    model = load_model(case, torch.float32, "cuda")
    tokens, P = torch.from_numpy(g["tokens"]), int(g["prefix_len"])
    logits, _ = model.forward(tokens, all_logits=True)  # prompts only: one packed prefill call
    assert (logits.cpu() - torch.from_numpy(g["logits_full"])).abs().max().item() < 5e-4
    logits, state = model.forward(tokens[:, :P])
    rows = [logits]
    for t in range(P, tokens.shape[1]):  # decodes only: the in-place decode kernel
        logits, state = model.forward(tokens[:, t:t + 1], state)
        rows.append(logits)
    assert (torch.stack(rows, 1).cpu() - torch.from_numpy(g["logits_step"])).abs().max().item() < 5e-4
    # decodes and prompts in one step: both kernels, slots out of order
    flat = tokens.reshape(-1)
    lengths = [5, 1, 17, 9]
    seqs = [flat[i * 3: i * 3 + n] for i, n in enumerate(lengths)]
    state = model.new_state(6)
    state.keys = type(state.keys)(model.config, 4, model.dtype, model.device)
    state.keys.set_step_lens(lengths)
    batch = StepBatch(token_ids=torch.cat(seqs).cuda(), query_lens=tuple(lengths), context_lens=(0,) * 4,
                      state_slots=torch.tensor([5, 0, 3, 1], device="cuda"))
    together = model.step(batch, state.rnn, state.keys)
    for i, s in enumerate(seqs):
        alone, _ = model.forward(s[None])
        assert (together[i] - alone[0]).abs().max().item() < 1e-4, f"sequence {i} differs in the batch"
