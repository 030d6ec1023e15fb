"""Programmatic dependent launch (`kernels.pdl`): when it is used, and that a chain of PDL launches
(each reading the one before it) computes exactly what plain launches do."""
from __future__ import annotations

import pytest
import torch

from kernels import pdl


def test_pdl_only_on_capable_cuda_devices_for_small_launches(monkeypatch):
    monkeypatch.delenv(pdl.ENV_VAR, raising=False)
    assert not pdl.enabled(torch.device("cpu"), 1)
    monkeypatch.setattr(pdl, "_capable", lambda index: True)
    cuda = torch.device("cuda", 0)
    assert pdl.enabled(cuda, 1) and pdl.enabled(cuda, pdl.MAX_ROWS)
    assert not pdl.enabled(cuda, pdl.MAX_ROWS + 1)
    monkeypatch.setenv(pdl.ENV_VAR, "0")
    assert not pdl.enabled(cuda, 1)
    monkeypatch.setattr(pdl, "_capable", lambda index: False)
    monkeypatch.delenv(pdl.ENV_VAR)
    assert not pdl.enabled(cuda, 1)
    assert pdl.launch_options(True) == {"launch_pdl": True} and pdl.launch_options(False) == {}


def _chain(x0: torch.Tensor, weights: list[torch.Tensor], ln: tuple, graph: bool) -> torch.Tensor:
    """Layers of norm -> product + residual, each launch reading the previous one's output (and
    the norm overwriting what the product before it read)."""
    from kernels.decode_gemv import decode_gemv
    from kernels.decode_norm_mix import decode_norm_mix

    bufs, normed = [x0.clone(), torch.empty_like(x0)], torch.empty_like(x0)

    def run():
        for i, w in enumerate(weights):
            src, dst = bufs[i % 2], bufs[(i + 1) % 2]
            decode_norm_mix(src, ln, ln_out=normed)
            decode_gemv(normed, w, dst, x0.shape[0], activation="residual", residual=src)

    run()  # eagerly (and compiles outside a capture)
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        bufs[0].copy_(x0)
        g.replay()
    torch.cuda.synchronize()
    return bufs[len(weights) % 2].clone()


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("batch", [1, 4])
def test_pdl_chain_equals_plain_launches(graph, batch, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    gen = torch.Generator(device="cuda").manual_seed(0)
    C = 2048
    weights = [(torch.randn(C, C, device="cuda", generator=gen) * C ** -0.5).bfloat16() for _ in range(12)]
    ln = (torch.ones(C, device="cuda", dtype=torch.bfloat16), torch.zeros(C, device="cuda", dtype=torch.bfloat16), 1e-5)
    x0 = torch.randn(batch, C, device="cuda", generator=gen).bfloat16()
    monkeypatch.setenv(pdl.ENV_VAR, "0")
    plain = _chain(x0, weights, ln, graph)
    monkeypatch.setenv(pdl.ENV_VAR, "1")
    assert pdl.enabled(x0.device, batch) == (torch.cuda.get_device_capability()[0] >= 9)
    chained = _chain(x0, weights, ln, graph)
    assert torch.isfinite(plain).all()
    assert torch.equal(chained, plain)
