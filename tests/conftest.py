"""Shared test fixtures: the conformance cases in ../shared/conformance (CI has them there too)."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

# tiny models: one thread is fastest, and several processes (a test and its server) share 2 cores
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE_DIR = ROOT.parent / "shared" / "conformance"


def conformance_cases() -> list[str]:
    if not CONFORMANCE_DIR.is_dir():
        return []
    return sorted(p.name for p in CONFORMANCE_DIR.iterdir() if (p / "golden.npz").is_file())


@functools.lru_cache(maxsize=None)
def load_model(case: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from engine.loader import load_checkpoint
    from engine.model import GoldFinchModel

    return GoldFinchModel(load_checkpoint(CONFORMANCE_DIR / case, dtype=dtype, device=device))


def greedy_plain(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens from the plain (unpaged, unbatched) model path on the CPU: what every fast
    path is compared with token for token."""
    logits, state = model.forward(torch.tensor([prompt], device=model.device))
    out = []
    for _ in range(max_tokens):
        out.append(int(logits[0].argmax()))
        logits, state = model.forward(torch.tensor([[out[-1]]], device=model.device), state)
    return out


@pytest.fixture(params=conformance_cases() or [pytest.param(None, marks=pytest.mark.skip("no conformance cases"))])
def case(request) -> str:
    return request.param


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
