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


def _packed_steps(model, steps):
    from engine.model import StepBatch

    gen = torch.Generator().manual_seed(3)
    state = model.new_state(3)
    for t in (state.rnn.wkv, state.rnn.tmix_shift, state.rnn.cmix_shift):
        t.copy_(0.5 * torch.randn(t.shape, generator=gen))
    logits = []
    for q in steps:
        context = tuple(state.keys.length(i) for i in range(3))
        state.keys.set_step_lens(list(q))
        tokens = torch.randint(0, model.config.vocab_size, (sum(q),), generator=gen).cuda()
        batch = StepBatch(token_ids=tokens, query_lens=q, context_lens=context,
                          state_slots=torch.arange(3, device="cuda"))
        logits.append(model.step(batch, state.rnn, state.keys).cpu())
    return logits, state


@pytest.mark.parametrize("case", CASES)
def test_compiled_long_steps_equal_eager(case):
    """Steps of >= MIN_COMPILED_TOKENS rows run the compiled layer functions (token shift read
    inside them, histories' keys derived compiled): the eager functions' results, over carried
    states, uneven packed prompts and a step continuing a 9K-token history."""
    from engine.layer_ops import MIN_COMPILED_TOKENS, LayerOps

    steps = ((5000, 1, 4000), (1, 9000, 3))
    assert all(sum(q) >= MIN_COMPILED_TOKENS for q in steps)
    model = load_model(case, torch.float32, "cuda")
    assert model.ops.compiled and model.ops.shift_inside
    compiled, compiled_state = _packed_steps(model, steps)
    model.ops = LayerOps(False)
    eager, eager_state = _packed_steps(model, steps)
    for a, b in zip(compiled, eager):
        assert (a - b).abs().max() < 1e-3
    for name in ("wkv", "tmix_shift", "cmix_shift"):
        assert (getattr(compiled_state.rnn, name) - getattr(eager_state.rnn, name)).abs().max() < 1e-3, name
