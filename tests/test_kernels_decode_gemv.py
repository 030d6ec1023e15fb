"""The fused decode products (`kernels.decode_gemv`) and norms (`kernels.decode_norm_mix`) against
their references.

Without CUDA the kernels run under Triton's interpreter at tiny shapes in float32 and float16: every
epilogue, column segments read by one or two input groups, strided rows, rows no segment covers
left untouched; norms with and without the addend and mixes. With CUDA the same run compiled, plus
the `gpu` cases at the 1.5B shape's decode products in bfloat16.
"""
from __future__ import annotations

import pytest
import torch

from triton_interpreter import (CUDA, import_kernels, interpreter_while_testing,  # noqa: F401 (fixture, test)
                                needs_subprocess, test_module_under_interpreter_in_subprocess)

DEVICE = "cuda" if CUDA else "cpu"
IN_SUBPROCESS = needs_subprocess()
# in import order (a reload of decode_gemv alone would keep the compiled epilogue and resident kernel)
_epi, _resident, _mod, _norm = import_kernels(
    ("kernels.decode_gemv_epilogue", "kernels.decode_gemv_resident", "kernels.decode_gemv", "kernels.decode_norm_mix"),
    "gemv_epilogue", IN_SUBPROCESS)
decode_gemv, plan_columns, GemvTuning = _mod.decode_gemv, _mod.plan_columns, _mod.GemvTuning
default_tuning, new_split_counters = _mod.default_tuning, _mod.new_split_counters
decode_norm_mix = _norm.decode_norm_mix

from kernels.decode_gemv_reference import (ColumnSegments, decode_gemv_reference,  # noqa: E402
                                           decode_norm_mix_reference)

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _t(g, *shape, scale=1.0, offset=0.0):
    return torch.randn(*shape, generator=g) * scale + offset


def _run_both(dtype, device, B, K, weight, G, plan=None, activation="none", act_cols=0, strided=False, seed=0,
              split_counters=None, product=None):
    """Kernel and reference on the same inputs: (out, reference out), rows no segment reads NaN.
    `product`: the kernel's launcher with `decode_gemv`'s arguments (default decode_gemv)."""
    g = torch.Generator().manual_seed(seed)
    x = _t(g, G * B, K + 8)[:, 4:K + 4] if strided else _t(g, G * B, K)
    N = weight.shape[0]
    kw = {}
    if activation in ("residual", "gated_residual"):
        kw["residual"] = _t(g, G * B, N).to(dtype).to(device)
    if activation == "gated_residual":
        kw["gate"] = _t(g, G * B, N, scale=2.0).to(dtype).to(device)
    x = x.to(dtype).to(device)
    out = torch.full((G * B, N), float("nan"), dtype=dtype, device=device)
    ref = out.clone()
    (product or decode_gemv)(x, weight, out, B, plan, activation=activation, act_cols=act_cols,
                             split_counters=split_counters, **kw)
    decode_gemv_reference(x, weight, ref, B, plan.segments if plan else None, activation=activation,
                          act_cols=act_cols, **kw)
    return out, ref


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def _weight(N, K, dtype, seed=1):
    return (_t(torch.Generator().manual_seed(seed), N, K) / K ** 0.5).to(dtype).to(DEVICE)


@pytest.fixture(params=["tiled", "rule"])
def kernel_choice(request, monkeypatch):
    """Every product through the tiled kernel, or through the kernel `decode_gemv` chooses (the
    resident one where `resident_applies`)."""
    if request.param == "tiled":
        monkeypatch.setenv(_resident.ENV_VAR, "0")
    else:
        monkeypatch.delenv(_resident.ENV_VAR, raising=False)
    return request.param


def _resident_product(x, weight, out, B, plan, activation, act_cols, split_counters, **kw):
    per_block = 2 if plan is not None and any(len(g) > 1 for g in plan.segments.groups) else 1
    return _resident.resident_gemv(x, weight, out, B, plan, activation, act_cols, kw.get("residual"), kw.get("gate"),
                                   rows=B * per_block)


def _covered(out, segments, B):
    """Where `out`'s rows are written: group g's rows over the columns of the segments it reads."""
    covered = torch.zeros_like(out, dtype=torch.bool)
    for start, end, groups in segments.spans():
        for grp in groups:
            covered[grp * B:(grp + 1) * B, start:end] = True
    return covered


# the decode step's stacked time-mix layout in miniature: r, k, v (read by v and v2), decay and v2 LoRA rows
FRONT = ColumnSegments(ends=(32, 64, 96, 112, 128), groups=((0,), (1,), (2, 3), (4,), (3,)))


@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_segments_read_their_groups(dtype, B, kernel_choice):
    K = 64
    w = _weight(128, K, dtype)
    plan = plan_columns(FRONT, K, DEVICE, GemvTuning(32, 32))
    out, ref = _run_both(dtype, DEVICE, B, K, w, 5, plan, strided=True, seed=B)
    covered = _covered(out, FRONT, B)
    assert out[~covered].isnan().all() and not out[covered].isnan().any()
    assert _rel(out[covered], ref[covered]) < TOL[dtype]


@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_two_groups_and_relu_square(dtype, B, kernel_choice):
    """The channel mix's stacked key/receptance product: relu^2 on the keys' columns only."""
    K, N = 80, 96 + 32  # K not a power of two
    segments = ColumnSegments(ends=(96, 128), groups=((0,), (1,)))
    plan = plan_columns(segments, K, DEVICE, GemvTuning(32, 32))
    out, ref = _run_both(dtype, DEVICE, B, K, _weight(N, K, dtype), 2, plan,
                         activation="relu_square", act_cols=96, seed=10 + B)
    assert _rel(out[:B, :96], ref[:B, :96]) < TOL[dtype] and _rel(out[B:, 96:], ref[B:, 96:]) < TOL[dtype]
    assert (out[:B, :96] >= 0).all() and (out[B:, 96:] < 0).any()  # squared keys, raw receptance


@pytest.mark.parametrize("activation", ["none", "tanh", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_one_group_epilogues(dtype, activation, kernel_choice):
    B, K, N = 3, 96, 48
    out, ref = _run_both(dtype, DEVICE, B, K, _weight(N, K, dtype, seed=2), 1, activation=activation, seed=5)
    assert _rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize("activation", ["none", "tanh", "relu_square", "residual", "gated_residual"])
@pytest.mark.parametrize("B", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_resident_weight_rows(dtype, B, activation):
    """The resident kernel: up to 4 input rows (K not a power of two, N not a multiple of the rows a
    program holds, strided input rows)."""
    K, N = 200, 70
    out, ref = _run_both(dtype, DEVICE, B, K, _weight(N, K, dtype, seed=B), 1, activation=activation, act_cols=40,
                         strided=True, seed=20 + B, product=_resident_product)
    assert not out.isnan().any() and _rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize("B", [1, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_resident_weight_rows_read_their_segments_groups(dtype, B):
    """The resident kernel's programs are narrower than the plan's blocks (8 columns against 16 at
    this K): each finds its block's groups in the table; rows no segment reads stay untouched."""
    K = 600
    plan = plan_columns(FRONT, K, DEVICE, GemvTuning(32, 32))
    assert _resident.RESIDENT_ELEMENTS // 1024 < plan.tuning.block_n
    out, ref = _run_both(dtype, DEVICE, B, K, _weight(128, K, dtype), 5, plan, strided=True, seed=30 + B,
                         product=_resident_product)
    covered = _covered(out, FRONT, B)
    assert out[~covered].isnan().all() and not out[covered].isnan().any()
    assert _rel(out[covered], ref[covered]) < TOL[dtype]


def test_where_the_resident_kernel_applies(monkeypatch):
    """Narrow weights over a short K up to NARROW_ROWS rows a program; any other weight but the head
    at batch 1 only; never with GOLDFINCH_GEMV_RESIDENT=0."""
    r, dev = _resident, torch.device(DEVICE)
    assert r.resident_applies(r.NARROW_N, r.NARROW_K, 4, r.NARROW_ROWS, dev)
    assert not r.resident_applies(r.NARROW_N, r.NARROW_K, 4, r.NARROW_ROWS + 1, dev)
    assert r.resident_applies(6272, 2048, 1, 2, dev) and r.resident_applies(2048, 7168, 1, 1, dev)
    assert not r.resident_applies(6272, 2048, 2, 4, dev) and not r.resident_applies(2048, 7168, 2, 2, dev)
    assert not r.resident_applies(65536, 2048, 1, 1, dev)  # the head
    assert not r.resident_applies(2048, r.RESIDENT_MAX_K + 1, 1, 1, dev)
    monkeypatch.setenv(r.ENV_VAR, "0")
    assert not r.resident_applies(64, 64, 1, 1, dev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gated_residual_over_a_long_k(dtype, kernel_choice):
    B, K, N = 2, 300, 32
    out, ref = _run_both(dtype, DEVICE, B, K, _weight(N, K, dtype, seed=3), 1, activation="gated_residual",
                         strided=True)
    assert _rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize("split,activation,B", [(2, "none", 1), (3, "gated_residual", 1), (3, "relu_square", 2),
                                                (4, "residual", 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_split_k_adds_its_runs_and_leaves_the_counters_zero(dtype, split, activation, B, monkeypatch):
    """K in `split` runs (the last one shorter), two groups of B rows: each column block's last run
    to arrive adds every run's partial; twice in a row, as a decode step replays the same counters
    (the tiled kernel: the resident one never splits)."""
    monkeypatch.setenv(_resident.ENV_VAR, "0")
    K, N = 200, 64  # runs of 96, 96 and 8 columns at split 3 with tiles of 32
    segments = ColumnSegments(ends=(32, 64), groups=((0,), (1,)))
    plan = plan_columns(segments, K, DEVICE, GemvTuning(16, 32, split_k=split))
    counters = new_split_counters(DEVICE, 16)
    w = _weight(N, K, dtype, seed=split)
    for seed in (1, 2):
        out, ref = _run_both(dtype, DEVICE, B, K, w, 2, plan, activation=activation, act_cols=48, seed=seed,
                             split_counters=counters)
        assert _rel(out[:B, :32], ref[:B, :32]) < TOL[dtype] and _rel(out[B:, 32:], ref[B:, 32:]) < TOL[dtype]
        assert out[:B, 32:].isnan().all() and out[B:, :32].isnan().all()
        assert counters.count_nonzero().item() == 0


def test_split_k_where_the_tuning_and_the_rows_allow(monkeypatch):
    """The value product's shape splits K by default in the tiled kernel, given counters and at most
    SPLIT_K_ROWS rows; without counters, or with more rows, one run (the same result up to float32
    sums); counters of the wrong type or too few are named."""
    monkeypatch.setenv(_resident.ENV_VAR, "0")
    K, N = 4160, 32
    assert default_tuning(N, K).split_k == 4 and default_tuning(N, K, split=False).split_k == 1
    assert default_tuning(N, 2048).split_k == 1 and default_tuning(8192, K).split_k == 1
    w = _weight(N, K, torch.float32, seed=7)
    counters = new_split_counters(DEVICE, 4)
    for B, c in ((1, counters), (1, None), (_mod.SPLIT_K_ROWS + 1, counters)):
        out, ref = _run_both(torch.float32, DEVICE, B, K, w, 1, activation="gated_residual", seed=B,
                             split_counters=c)
        assert _rel(out, ref) < TOL[torch.float32]
    assert counters.count_nonzero().item() == 0
    # a plan's split tuning over too many rows (two groups of 3): one run of K on the plan's blocks
    plan = plan_columns(ColumnSegments(ends=(32, 64), groups=((0,), (1,))), 64, DEVICE, GemvTuning(32, 32, split_k=2))
    out, ref = _run_both(torch.float32, DEVICE, 3, 64, _weight(64, 64, torch.float32), 2, plan, seed=9,
                         split_counters=counters)
    tol = TOL[torch.float32]
    assert _rel(out[:3, :32], ref[:3, :32]) < tol and _rel(out[3:, 32:], ref[3:, 32:]) < tol
    x, out = torch.randn(1, K, device=DEVICE), torch.empty(1, N, device=DEVICE)
    with pytest.raises(ValueError, match="split_counters: expected int32"):
        decode_gemv(x, w, out, 1, split_counters=counters.long())
    with pytest.raises(ValueError, match="split_counters: expected int32"):
        decode_gemv(x, w, out, 1, split_counters=counters[:0])


@pytest.mark.parametrize("n_mix,lora_rank", [(0, 0), (1, 0), (2, 0), (1, 24), (1, 160)])
@pytest.mark.parametrize("add", [False, True], ids=["x", "x+addend"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_norm_mixes_and_lora(dtype, add, n_mix, lora_rank):
    B, K = 3, 80
    g = torch.Generator().manual_seed(n_mix + lora_rank)
    cast = lambda t: t.to(dtype).to(DEVICE)  # noqa: E731
    x = cast(_t(g, B, K + 6, scale=3.0, offset=2.0))[:, 2:K + 2]  # strided rows
    ln = (cast(_t(g, K, scale=0.2, offset=1.0)), cast(_t(g, K, scale=0.1)), 1e-5)
    addend = cast(_t(g, B, K)) if add else None
    prev, mix = (cast(_t(g, B, K)), cast(torch.rand(n_mix, K, generator=g))) if n_mix else (None, None)
    w1t = cast(_t(g, lora_rank, K, scale=K ** -0.5)) if lora_rank else None
    outs = []
    for fn in (decode_norm_mix, decode_norm_mix_reference):
        ln_out = torch.full((B, K), float("nan"), dtype=dtype, device=DEVICE)
        out = torch.full((n_mix * B, K), float("nan"), dtype=dtype, device=DEVICE) if n_mix else None
        h = torch.full((B, lora_rank), float("nan"), dtype=dtype, device=DEVICE) if lora_rank else None
        fn(x, ln, ln_out=ln_out, prev=prev, mix=mix, out=out, addend=addend, lora_w1t=w1t, lora_out=h)
        outs.append((ln_out, out, h))
    for got, want in zip(*outs):
        assert (got is None) == (want is None)
        if got is not None:
            assert not got.isnan().any() and _rel(got, want) < TOL[dtype]


def test_norm_matches_pytorch_on_offset_rows():
    """Rows with a large mean: the statistics from the centred row give PyTorch's layer norm."""
    B, K = 2, 64
    x = (torch.randn(B, K) + 300.0).to(DEVICE)
    lw, lb = torch.ones(K, device=DEVICE), torch.zeros(K, device=DEVICE)
    ln_out = torch.empty(B, K, device=DEVICE)
    decode_norm_mix(x, (lw, lb, 1e-5), ln_out=ln_out)
    assert (ln_out - torch.nn.functional.layer_norm(x, (K,), lw, lb, 1e-5)).abs().max().item() < 1e-4


def test_segments_must_fall_on_blocks_of_16():
    with pytest.raises(ValueError, match="segments: boundaries"):
        plan_columns(ColumnSegments(ends=(40, 64), groups=((0,), (1,))), 32, DEVICE)
    with pytest.raises(ValueError, match="segments: each segment"):
        ColumnSegments(ends=(16,), groups=((0, 1, 2),))
    plan = plan_columns(ColumnSegments(ends=(48, 80), groups=((0,), (1, 2))), 32, DEVICE, GemvTuning(64, 32))
    assert plan.tuning.block_n == 16 and plan.block_groups.tolist() == [[0, -1]] * 3 + [[1, 2]] * 2


def test_bad_inputs_name_the_field():
    B, K, N = 2, 32, 16
    x, w = torch.randn(B, K, device=DEVICE), _weight(N, K, torch.float32)
    out = torch.empty(B, N, device=DEVICE)
    with pytest.raises(ValueError, match="x: expected"):
        decode_gemv(x[:, :-1], w, out, B)
    with pytest.raises(ValueError, match="out: expected"):
        decode_gemv(x, w, out.half(), B)
    with pytest.raises(ValueError, match="residual: required"):
        decode_gemv(x, w, out, B, activation="residual")
    with pytest.raises(ValueError, match="activation"):
        decode_gemv(x, w, out, B, activation="gelu")
    ln = (torch.ones(K, device=DEVICE), torch.zeros(K, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="out: the mixed rows"):
        decode_norm_mix(x, ln, prev=x, mix=torch.ones(1, K, device=DEVICE))
    with pytest.raises(ValueError, match="prev, mix and out"):
        decode_norm_mix(x, ln, mix=torch.ones(1, K, device=DEVICE), out=x)
    with pytest.raises(ValueError, match="lora_w1t and lora_out"):
        decode_norm_mix(x, ln, ln_out=torch.empty_like(x), lora_w1t=torch.ones(4, K, device=DEVICE))
    with pytest.raises(ValueError, match="ln weight"):
        decode_norm_mix(x, (ln[0][:-1], ln[1], 1e-5), ln_out=torch.empty_like(x))
    with pytest.raises(ValueError, match="out: expected"):
        decode_norm_mix(x, ln, prev=x, mix=torch.ones(2, K, device=DEVICE), out=torch.empty_like(x))


# ---- GPU: the 1.5B shape's decode products in bfloat16 --------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 5, 16])
def test_decode_products_at_the_1b5_shape_bf16(B):
    bf = torch.bfloat16
    front = ColumnSegments(ends=(2048, 4096, 6144, 6208, 6272), groups=((0,), (1,), (2, 3), (4,), (3,)))
    w = _weight(6272, 2048, bf)
    out, ref = _run_both(bf, "cuda", B, 2048, w, 5, plan_columns(front, 2048, "cuda"), seed=B)
    assert _rel(out.nan_to_num(), ref.nan_to_num()) < TOL[bf]
    cmix = ColumnSegments(ends=(7168, 9216), groups=((0,), (1,)))
    out, ref = _run_both(bf, "cuda", B, 2048, _weight(9216, 2048, bf), 2, plan_columns(cmix, 2048, "cuda"),
                         activation="relu_square", act_cols=7168, seed=B)
    assert _rel(out.nan_to_num(), ref.nan_to_num()) < TOL[bf]
    counters = new_split_counters("cuda")
    for c in (None, counters):  # the value product in one run of K, and split where B allows
        out, ref = _run_both(bf, "cuda", B, 7168, _weight(2048, 7168, bf), 1, activation="gated_residual",
                             strided=True, split_counters=c)
        assert _rel(out, ref) < TOL[bf] and counters.count_nonzero().item() == 0
    out, ref = _run_both(bf, "cuda", B, 2048, _weight(2048, 2048, bf), 1, activation="residual")
    assert _rel(out, ref) < TOL[bf]
    out, ref = _run_both(bf, "cuda", B, 2048, _weight(160, 2048, bf), 1, activation="tanh")
    assert _rel(out, ref) < TOL[bf]
    out, ref = _run_both(bf, "cuda", B, 2048, _weight(65536, 2048, bf), 1)  # the head
    assert _rel(out, ref) < TOL[bf]
