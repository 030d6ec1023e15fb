"""GPU paths (Triton kernels, CUDA tensors) token for token against the plain CPU path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import CONFORMANCE_DIR, greedy_plain, load_model

pytestmark = pytest.mark.gpu
CASES = ["goldfinch_l6_d128", "goldfinch_upgrade_l6_d256"]


@pytest.mark.parametrize("case", CASES)
def test_conformance_fp32_on_gpu(case):
    g = np.load(CONFORMANCE_DIR / case / "golden.npz")
    model = load_model(case, torch.float32, "cuda")
    logits, _ = model.forward(torch.from_numpy(g["tokens"]).cuda(), all_logits=True)
    assert (logits.cpu() - torch.from_numpy(g["logits_full"])).abs().max() < 1e-3


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["graphs", "fast_eager", "general"])
def test_engine_batched_on_gpu_equals_plain_cpu(case, mode):
    """Decode through CUDA graphs, the same static step launched eagerly, and the general step."""
    from engine.config_engine import EngineConfig
    from engine.engine import LLMEngine
    from engine.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (int(n),), generator=gen).tolist() for n in (3, 17, 40, 64, 9, 128)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    gpu = LLMEngine(load_model(case, torch.float32, "cuda"), None,
                    EngineConfig(cache_tokens=8192, max_num_batched_tokens=64, check_integrity=True,
                                 kv_working_set_bytes=256 << 20, max_num_seqs=8,
                                 cuda_graphs=mode == "graphs", decode_fast_path=mode != "general"))
    outs = gpu.generate(prompts, params)
    assert (gpu.runner.num_fast_steps > 0) == (mode != "general")
    assert (gpu.runner.graphs is not None) == (mode == "graphs")
    cpu_model = load_model(case)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == greedy_plain(cpu_model, p, 12)
