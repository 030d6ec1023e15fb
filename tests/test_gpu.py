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


def test_engine_sampling_through_the_kernels_equals_the_torch_sampler():
    """A bf16 model decoding sampled requests (temperature, top-p, greedy rows among them) through
    CUDA graphs: the tokens with the sampler's kernel path (`kernels.token_sample`) are those of its
    torch path, and the kernel path was taken."""
    from engine.config_engine import EngineConfig
    from engine.engine import LLMEngine
    from engine.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (int(n),), generator=gen).tolist() for n in (5, 33, 70, 12)]
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=8, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=1.3, top_p=0.5, seed=9, max_tokens=16, ignore_eos=True)]

    def run(kernels: bool) -> tuple[list[list[int]], int]:
        engine = LLMEngine(load_model(CASES[0], torch.bfloat16, "cuda"), None,
                           EngineConfig(cache_tokens=8192, max_num_batched_tokens=64, kv_working_set_bytes=256 << 20,
                                        max_num_seqs=8))
        sampler, chosen = engine.sampling.sampler, []
        applies = sampler.fused_applies

        def counted(logits, batch):
            chosen.append(kernels and applies(logits, batch))
            return chosen[-1]

        sampler.fused_applies = counted
        outs = engine.generate(prompts, params)
        return [o.outputs[0].token_ids for o in outs], sum(chosen)

    with_kernels, kernel_calls = run(True)
    with_torch, _ = run(False)
    assert kernel_calls > 0
    assert with_kernels == with_torch
    assert len(set(with_kernels[1])) > 3  # sampled, not collapsed to one token


def _long_steps(model):
    """Uneven packed prompts and a step continuing a 9K-token history (three sequences), and two
    long steps of one sequence, over random carried states."""
    from engine.model import StepBatch

    gen = torch.Generator().manual_seed(3)
    states = (model.new_state(3), model.new_state(1))
    for state in states:
        for t in (state.rnn.wkv, state.rnn.tmix_shift, state.rnn.cmix_shift):
            t.copy_(0.5 * torch.randn(t.shape, generator=gen))
    logits = []
    for q, state in (((5000, 1, 4000), states[0]), ((1, 9000, 3), states[0]), ((9000,), states[1]),
                     ((8200,), states[1])):
        context = tuple(state.keys.length(i) for i in range(len(q)))
        state.keys.set_step_lens(list(q))
        tokens = torch.randint(0, model.config.vocab_size, (sum(q),), generator=gen).cuda()
        batch = StepBatch(token_ids=tokens, query_lens=q, context_lens=context,
                          state_slots=torch.arange(len(q), device="cuda"))
        logits.append(model.step(batch, state.rnn, state.keys).cpu())
    return logits, states


@pytest.mark.parametrize("case", CASES)
def test_compiled_long_steps_equal_eager(case):
    """Steps of >= MIN_COMPILED_TOKENS rows run the compiled layer functions (a single sequence's
    token shift read inside them, histories' keys derived compiled): the eager functions' results."""
    from engine.layer_ops import MIN_COMPILED_TOKENS, LayerOps

    model = load_model(case, torch.float32, "cuda")
    assert model.ops.compiled and model.ops.shift_inside
    assert 8200 >= model.ops.min_compiled_tokens == MIN_COMPILED_TOKENS
    compiled, compiled_states = _long_steps(model)
    model.ops = LayerOps(False)
    eager, eager_states = _long_steps(model)
    for a, b in zip(compiled, eager):
        assert (a - b).abs().max() < 1e-3
    for c, e in zip(compiled_states, eager_states):
        for name in ("wkv", "tmix_shift", "cmix_shift"):
            assert (getattr(c.rnn, name) - getattr(e.rnn, name)).abs().max() < 1e-3, name
