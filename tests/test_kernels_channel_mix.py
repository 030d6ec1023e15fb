"""The decode step's fused channel mix (`kernels.channel_mix_decode`) against its PyTorch
reference, and the reference against the model's own channel mix (`engine.layers`).

Without CUDA the kernels run under Triton's interpreter at tiny shapes in float32 and float16 (the
interpreter gets bfloat16 wrong); with CUDA the same cases run compiled, plus the `gpu` cases at the
1.5B shape (C=2048, F=7168) in bfloat16 and a CUDA graph replay.
"""
from __future__ import annotations

import pytest
import torch

from triton_interpreter import CUDA, enter_test, import_kernels, needs_subprocess, run_module_in_subprocess

DEVICE = "cuda" if CUDA else "cpu"
_IN_SUBPROCESS = needs_subprocess()
(_mod,) = import_kernels(("kernels.channel_mix_decode",), "channel_mix_key_receptance_fwd_kernel", _IN_SUBPROCESS)
channel_mix_decode = _mod.channel_mix_decode

from kernels.channel_mix_decode_reference import channel_mix_decode_reference  # noqa: E402


@pytest.fixture(autouse=True)
def _interpreter_while_testing(request, monkeypatch):
    enter_test(request, monkeypatch, _IN_SUBPROCESS)


@pytest.mark.skipif(not _IN_SUBPROCESS, reason="the kernel tests run in this process")
def test_module_under_interpreter_in_subprocess():
    run_module_in_subprocess(__file__)


def _inputs(M: int, C: int, F: int, dtype: torch.dtype, seed: int = 0, device: str = DEVICE):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, scale=1.0: (scale * torch.randn(*shape, generator=g)).to(dtype).to(device)  # noqa: E731
    return dict(x=rnd(M, C), xf=rnd(M, C), prev=rnd(M, C), maa_k=rnd(C, scale=0.5), maa_r=rnd(C, scale=0.5),
                kr_weight=rnd(F + C, C, scale=C ** -0.5), value_weight=rnd(C, F, scale=F ** -0.5))


TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _close(out, ref, dtype):
    err = (out.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-6)
    assert err < TOL[dtype], f"relative error {err:.3g}"


def test_reference_is_the_models_channel_mix():
    from engine import layers as L
    from engine.decode_ops import channel_mix_residual_stacked

    class W(dict):
        def __getitem__(self, k):
            return dict.__getitem__(self, k)

    t = _inputs(3, 32, 112, torch.float32, device="cpu")
    F = 112
    w = W({"ffn.time_maa_k": t["maa_k"], "ffn.time_maa_r": t["maa_r"], L.CMIX_STACKED: t["kr_weight"],
           "ffn.value.weight": t["value_weight"]})

    class Cfg:
        dim_ffn, n_embd = F, 32

    ref = channel_mix_decode_reference(**t)
    model = channel_mix_residual_stacked(t["x"], t["xf"], t["prev"], w, Cfg)
    assert torch.allclose(ref, model, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("C,F", [(32, 112), (64, 224), (48, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_reference(M, C, F, dtype):
    t = _inputs(M, C, F, dtype, seed=M + C)
    _close(channel_mix_decode(**t), channel_mix_decode_reference(**t), dtype)


@pytest.mark.parametrize("block_n_kr,block_n_value,block_k", [(16, 16, 32), (32, 32, 64), (64, 16, 128)])
def test_launch_choices_give_the_same_result(block_n_kr, block_n_value, block_k):
    t = _inputs(2, 64, 192, torch.float32, seed=5)
    out = channel_mix_decode(**t, block_n_kr=block_n_kr, block_n_value=block_n_value, block_k=block_k)
    _close(out, channel_mix_decode_reference(**t), torch.float32)


def test_strided_rows():
    """Rows may be views with a row stride (the decode step's token-shift rows are)."""
    t = _inputs(4, 32, 112, torch.float32, seed=9)
    wide = torch.zeros(4, 96, device=DEVICE)
    wide[:, 16:48] = t["prev"]
    t2 = {**t, "prev": wide[:, 16:48]}
    _close(channel_mix_decode(**t2), channel_mix_decode_reference(**t), torch.float32)


def test_input_checks_name_the_argument():
    t = _inputs(2, 32, 112, torch.float32)
    with pytest.raises(ValueError, match="x must be"):
        channel_mix_decode(**{**t, "x": torch.zeros(17, 32, device=DEVICE)})
    with pytest.raises(ValueError, match="prev must be"):
        channel_mix_decode(**{**t, "prev": t["prev"][:1]})
    with pytest.raises(ValueError, match="maa_r must be"):
        channel_mix_decode(**{**t, "maa_r": t["maa_r"][:5]})
    with pytest.raises(ValueError, match="kr_weight must be"):
        channel_mix_decode(**{**t, "kr_weight": t["kr_weight"][:100]})
    with pytest.raises(ValueError, match="multiple of 16"):
        t3 = _inputs(2, 32, 100, torch.float32)
        channel_mix_decode(**t3)
    with pytest.raises(ValueError, match="share one dtype"):
        channel_mix_decode(**{**t, "value_weight": t["value_weight"].half()})
    with pytest.raises(ValueError, match="contiguous last dim"):
        channel_mix_decode(**{**t, "kr_weight": t["kr_weight"].t().contiguous().t()})


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("M", [1, 8, 16])
def test_gpu_real_shape(M):
    t = _inputs(M, 2048, 7168, torch.bfloat16, seed=M)
    _close(channel_mix_decode(**t), channel_mix_decode_reference(**t), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_cuda_graph_replay_with_new_rows():
    t = _inputs(4, 2048, 7168, torch.bfloat16, seed=1)
    channel_mix_decode(**t)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = channel_mix_decode(**t)
    new = _inputs(4, 2048, 7168, torch.bfloat16, seed=2)
    for name in ("x", "xf", "prev"):
        t[name].copy_(new[name])
    graph.replay()
    _close(out, channel_mix_decode_reference(**t), torch.bfloat16)
