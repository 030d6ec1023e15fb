"""The Triton Finch token-shift mixes against their reference (the model's own arithmetic), and the
model path through the dispatching custom op.

Without CUDA the kernel runs under Triton's interpreter at tiny shapes (C = 48 to 160, LoRA ranks 8
to 32, both mix counts) in float32 and float16; with CUDA the same cases run compiled, plus the `gpu`
cases at the 1.5B shape in bfloat16 (eager and inside `torch.compile`).
"""
from __future__ import annotations

import pytest
import torch

from triton_interpreter import (CUDA, import_kernels, interpreter_while_testing,  # noqa: F401 (fixture, test)
                                needs_subprocess, test_module_under_interpreter_in_subprocess)

DEVICE = "cuda" if CUDA else "cpu"
IN_SUBPROCESS = needs_subprocess()
(_mod,) = import_kernels(("kernels.finch_mix",), "finch_mix_fwd_kernel", IN_SUBPROCESS)
finch_mix = _mod.finch_mix

from kernels.finch_mix_reference import finch_mix_reference  # noqa: E402


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _rel(out, ref):
    return ((out.double().cpu() - ref.double().cpu()).abs().max() / ref.double().cpu().abs().max()).item()


def _inputs(N, C, n_mix, R, dtype, device, shifted, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape, scale=1.0, offset=0.0: (torch.randn(*shape, generator=g) * scale + offset)  # noqa: E731
    # x as rows of a wider buffer (a strided view, as the model's packed rows can be)
    x = t(N, C + 8)[:, 3:C + 3]
    prev = t(1 if shifted else N, C)
    h = torch.tanh(t(N, n_mix * R))
    w2 = t(n_mix, R, C, scale=R ** -0.5)
    maa = t(n_mix, C, scale=0.3, offset=0.5)
    return [v.to(dtype=dtype, device=device) for v in (x, prev, h, w2, maa)]


def _reference64(x, prev, h, w2, maa, shifted):
    """The same formula in float64 on the CPU."""
    return finch_mix_reference(*(v.double().cpu() for v in (x, prev, h, w2, maa)), shifted)


CASES = [  # N, C, n_mix, R
    (1, 48, 5, 8), (70, 64, 5, 32), (130, 160, 5, 16), (33, 96, 4, 24)]


@pytest.mark.parametrize("shifted", [False, True], ids=["prev", "shifted"])
@pytest.mark.parametrize("N,C,n_mix,R", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_mixes_match_the_reference(N, C, n_mix, R, dtype, shifted):
    args = _inputs(N, C, n_mix, R, dtype, DEVICE, shifted, seed=N + C)
    out = finch_mix(*args, shifted)
    assert out.shape == (n_mix, N, C) and out.dtype == dtype and out.is_contiguous()
    assert _rel(out, _reference64(*args, shifted)) < TOL[dtype]


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "per_mix"])
@pytest.mark.parametrize("N,C,n_mix,R", [(3, 48, 5, 8), (16, 64, 1, 32), (2, 96, 4, 24), (40, 32, 5, 16)])
def test_preloaded_weights_match_the_reference(N, C, n_mix, R, preload):
    """Both ways of reading the LoRA weights (all mixes' rows at once before the PDL wait, the decode
    default; or each mix's rows in its turn), at ranks that are and are not multiples of 16."""
    args = _inputs(N, C, n_mix, R, torch.float32, DEVICE, False, seed=R)
    out = finch_mix(*args, False, preload=preload)
    assert _rel(out, _reference64(*args, False)) < TOL[torch.float32]


@pytest.mark.parametrize("shifted", [False, True], ids=["prev", "shifted"])
@pytest.mark.parametrize("N,C,n_mix,R", [(1, 48, 5, 32), (3, 96, 4, 16), (4, 64, 1, 32), (2, 40, 3, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_one_row_programs_match_the_reference(N, C, n_mix, R, dtype, shifted):
    """A few rows at a power-of-two rank: a program a row, every mix's product summed at once
    (`ONE_ROW`); channels that do and do not fill the last block."""
    assert N <= _mod.ONE_ROW_ROWS
    args = _inputs(N, C, n_mix, R, dtype, DEVICE, shifted, seed=N * R)
    out = finch_mix(*args, shifted)
    assert _rel(out, _reference64(*args, shifted)) < TOL[dtype]


def test_one_row_programs_only_where_they_apply():
    """Too many LoRA rows to hold at once (five mixes of rank 64), or a rank that is not a power of
    two: the 16-row tiles, same results; one-row tiles asked for where they cannot apply: an error."""
    for n_mix, R in ((5, 64), (4, 24)):
        args = _inputs(1, 48, n_mix, R, torch.float32, DEVICE, False, seed=R)
        assert _rel(finch_mix(*args, False), _reference64(*args, False)) < TOL[torch.float32]
    args = _inputs(1, 48, 4, 24, torch.float32, DEVICE, False)
    with pytest.raises(ValueError, match="tiles: rows per program 1"):
        finch_mix(*args, False, tiles=(1, 32, 2))
    args = _inputs(1, 48, 5, 32, torch.float32, DEVICE, False)
    with pytest.raises(ValueError, match="tiles: rows per program 1"):
        finch_mix(*args, False, tiles=(1, 32, 2), preload=False)


def test_shifted_reads_the_previous_row_and_the_given_first():
    """Row 0 mixes with the given row, row t with x[t - 1]: checked on inputs where only dx matters."""
    N, C, R = 5, 32, 16
    x = torch.arange(N, dtype=torch.float32)[:, None].expand(N, C).contiguous().to(DEVICE)
    first = torch.full((1, C), -7.0, device=DEVICE)
    h = torch.zeros(N, R, device=DEVICE)
    w2 = torch.zeros(1, R, C, device=DEVICE)
    maa = torch.ones(1, C, device=DEVICE)  # out = prev
    out = finch_mix(x, first, h, w2, maa, True)[0].cpu()
    assert torch.equal(out[:, 0], torch.tensor([-7.0, 0.0, 1.0, 2.0, 3.0]))


def test_bad_inputs_name_the_field():
    x, prev, h, w2, maa = _inputs(8, 32, 5, 16, torch.float32, DEVICE, False)
    with pytest.raises(ValueError, match="h: expected"):
        finch_mix(x, prev, h[:, :-1], w2, maa, False)
    with pytest.raises(ValueError, match="prev: expected"):
        finch_mix(x, prev, h, w2, maa, True)  # shifted takes one row
    with pytest.raises(ValueError, match="maa: expected"):
        finch_mix(x, prev, h, w2, maa.half(), False)
    with pytest.raises(ValueError, match="w2: expected"):
        finch_mix(x, prev, h, w2[:, :, :-1], maa, False)


def test_dispatch_op_is_the_reference_on_the_cpu():
    from kernels import dispatch

    args = _inputs(9, 32, 5, 8, torch.float32, "cpu", True)
    assert torch.equal(dispatch.finch_mix(*args, True), finch_mix_reference(*args, True))


# ---- GPU: the 1.5B shape (C = 2048, five mixes of rank 32) ------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("N", [1, 2048, 5000])
@pytest.mark.parametrize("shifted", [False, True], ids=["prev", "shifted"])
def test_mixes_at_the_1b5_shape_bf16(N, shifted):
    args = _inputs(N, 2048, 5, 32, torch.bfloat16, "cuda", shifted, seed=N)
    assert _rel(finch_mix(*args, shifted), _reference64(*args, shifted)) < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_compiled_model_function_uses_the_op():
    """`torch.compile` of the time-mix projections (dynamic shapes, as `engine.layer_ops` compiles
    them) gives the eager reference's projections within bf16 rounding, at two lengths."""
    from engine import layers as L
    from engine.model import GoldFinchModel
    from engine.random_model import PAPER_1B5_CONFIG, random_checkpoint
    from kernels import dispatch

    model = GoldFinchModel(random_checkpoint(PAPER_1B5_CONFIG, dtype=torch.bfloat16, device="cuda"),
                           compile_layers=False)
    w, cfg = model.blocks[3], model.config
    fn = torch.compile(L.finch_tmix_projections_shifted, dynamic=True)
    for N in (300, 2048):
        x = torch.randn(N, cfg.n_embd, device="cuda", dtype=torch.bfloat16)
        carried = torch.randn(1, cfg.n_embd, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():  # as the model runs it
            got = fn(x, carried, w, cfg)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(dispatch.ENV_VAR, "reference")
            want = L.finch_tmix_projections(x, L.token_shift(x, carried), w, cfg)
        for name, a, b in zip(("r", "k", "v", "log_decay"), got, want):
            assert _rel(a, b) < 3e-2, name
