"""The prefill graphs' padded static step (`engine.prefill_graphs`) against the plain model step: on
the CPU it runs eagerly (the padding arithmetic), on a GPU replayed from CUDA graphs."""
from __future__ import annotations

import pytest
import torch

from conftest import greedy_plain, load_model
from engine.prefill_graphs import PrefillGraphs, bucket_sizes


def test_bucket_sizes():
    assert bucket_sizes(2048) == (128, 256, 512, 1024, 2048)
    assert bucket_sizes(100) == (128,)
    assert bucket_sizes(3000) == (128, 256, 512, 1024, 2048, 4096)
    assert bucket_sizes(1 << 20) == (128, 256, 512, 1024, 2048, 4096, 8192)
    assert bucket_sizes(40, smallest=16, largest=64) == (16, 32, 64)


def _chunks_both_ways(model, chunks: list[int], buckets: tuple[int, ...]):
    """One sequence's chunks from random carried states, through `model.step` and through the
    padded static step; returns (logits, states) of each."""
    from engine.model import StepBatch

    gen = torch.Generator().manual_seed(11)
    plain, padded = model.new_state(2), model.new_state(2)  # slot 1 of `padded` is the scratch slot
    for t in (plain.rnn.wkv, plain.rnn.tmix_shift, plain.rnn.cmix_shift):
        t.copy_(0.5 * torch.randn(t.shape, generator=gen))
    for name in ("wkv", "tmix_shift", "cmix_shift"):
        getattr(padded.rnn, name).copy_(getattr(plain.rnn, name))
    graphs = PrefillGraphs(model, padded.rnn, buckets, scratch_state_slot=1, use_graphs=model.device.type == "cuda")
    graphs.capture()
    out = ([], [])
    for n in chunks:
        tokens = torch.randint(0, model.config.vocab_size, (n,), generator=gen).to(model.device)
        for state, logits, use in ((plain, out[0], False), (padded, out[1], True)):
            state.keys.set_step_lens([n, 0])
            batch = StepBatch(token_ids=tokens, query_lens=(n,), context_lens=(state.keys.length(0),),
                              state_slots=torch.zeros(1, dtype=torch.long, device=model.device))
            view = _FirstSequence(state.keys)
            finch = graphs.run(batch.token_ids, batch.state_slots) if use else None
            logits.append(model.step(batch, state.rnn, view, finch_out=finch).float().cpu())
    return out, (plain, padded), graphs


class _FirstSequence:
    """The key-cache view of sequence 0 of a two-sequence contiguous cache (sequence 1 is never used)."""

    def __init__(self, keys) -> None:
        self.keys = keys

    def write(self, compressed, token_ids):
        self.keys.write(compressed, token_ids)

    def read(self, i):
        return self.keys.read(i)


def test_padded_chunks_equal_the_plain_step(case):
    """Chunks of several lengths (a bucket exactly, padded within one WKV chunk and across several),
    continuing one sequence: the logits and every RNN state of the plain step."""
    model = load_model(case)
    (plain, padded), (s_plain, s_padded), graphs = _chunks_both_ways(model, [64, 5, 100, 1, 128, 70], (64, 128))
    assert graphs.num_replays == 6
    for i, (a, b) in enumerate(zip(plain, padded)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), f"chunk {i}: {(a - b).abs().max()}"
    for name in ("wkv", "tmix_shift", "cmix_shift"):
        a, b = getattr(s_plain.rnn, name)[:, 0], getattr(s_padded.rnn, name)[:, 0]
        # relative to the state's scale: the upgrade model's WKV states reach ~70, and chunk
        # boundaries (padding) change the float32 summation order (1.5e-5 = 2e-7 of that with
        # torch 2.13's CPU kernels; an element-wise 1e-5 failed with torch 2.11's)
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < 2e-6, f"{name}: {err:.2e}"
    a, b = s_plain.keys.read(0), s_padded.keys.read(0)
    assert torch.allclose(a[0], b[0], atol=1e-5, rtol=1e-5) and torch.equal(a[1], b[1])


def test_run_rejects_a_chunk_longer_than_the_largest_bucket():
    model = load_model("goldfinch_l6_d128")
    graphs = PrefillGraphs(model, model.new_state(1).rnn, (64,), scratch_state_slot=0, use_graphs=False)
    assert graphs.applies((64,)) and graphs.applies((3, 64)) and not graphs.applies((65,))
    assert not graphs.applies((3, 65)) and not graphs.applies(())
    with pytest.raises(ValueError, match="chunk of 65 tokens"):
        graphs.run(torch.zeros(65, dtype=torch.long), torch.zeros(1, dtype=torch.long))


def test_engine_with_prefill_graphs_gives_the_plain_tokens(case):
    """The runner replays (here: runs the padded static step for) every one-sequence chunk; the
    tokens are the plain path's, with chunks of several sizes and sequences one after another."""
    from engine.config_engine import EngineConfig
    from engine.engine import LLMEngine
    from engine.sampling_params import SamplingParams

    model = load_model(case)
    engine = LLMEngine(model, None, EngineConfig(cache_tokens=4096, max_num_batched_tokens=48, max_num_seqs=1,
                                                 check_integrity=True, kv_working_set_bytes=64 << 20))
    engine.runner.prefill_graphs = PrefillGraphs(model, engine.cache.rnn, bucket_sizes(48, 16, 64),
                                                 engine.cache.scratch_state_slot, use_graphs=False)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (7, 100, 48, 33)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for p in prompts:
        out = engine.generate([p], params)[0]
        assert out.outputs[0].token_ids == greedy_plain(model, p, 6)
    # every prompt chunk, and the decode steps that found no complete working set
    assert engine.runner.prefill_graphs.num_replays >= sum(-(-len(p) // 48) for p in prompts)


def _mixed_engine(model, use_graphs: bool, **config):
    from engine.config_engine import EngineConfig
    from engine.engine import LLMEngine

    engine = LLMEngine(model, None, EngineConfig(cache_tokens=8192, check_integrity=True,
                                                 kv_working_set_bytes=64 << 20, **config))
    if not use_graphs:  # the CPU: the padded static step, launched eagerly
        engine.runner.prefill_graphs = PrefillGraphs(model, engine.cache.rnn, bucket_sizes(48, 16, 64),
                                                     engine.cache.scratch_state_slot, use_graphs=False)
    return engine


def _mixed_prompts(n_short: int, long_lens: tuple[int, ...]):
    gen = torch.Generator().manual_seed(8)
    return [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (3,) * n_short + long_lens]


def test_decodes_beside_a_chunk_run_split_with_the_plain_tokens(case):
    """Short prompts decode while long ones are fed in chunks: such steps run the static decode
    step for the decodes and the prefill graphs for the chunks (`ModelRunner._decodes_and_chunks`),
    and a step of several prompts replays each one's graph; the tokens are the plain path's."""
    from engine.sampling_params import SamplingParams

    model = load_model(case)
    engine = _mixed_engine(model, False, max_num_batched_tokens=48, max_num_seqs=4)
    prompts = _mixed_prompts(2, (100, 90))
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    assert engine.runner.num_split_steps >= 3
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == greedy_plain(model, p, 30)


@pytest.mark.parametrize("limit", [16, 2])
def test_steps_of_several_prompts(case, limit, monkeypatch):
    """Four prompts in one step: each sequence's Finch layers replayed from its bucket and the GOLD
    layers packed; above `MAX_GRAPHED_SEQUENCES` the eager packed step. The plain path's tokens."""
    from engine import model_runner
    from engine.sampling_params import SamplingParams

    monkeypatch.setattr(model_runner, "MAX_GRAPHED_SEQUENCES", limit)
    model = load_model(case)
    engine = _mixed_engine(model, False, max_num_batched_tokens=64, max_num_seqs=4)
    prompts = _mixed_prompts(0, (9, 20, 14, 17))
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    replays = engine.runner.prefill_graphs.num_replays
    assert replays >= 4 if limit == 16 else replays == 0  # its decodes take the static decode step
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == greedy_plain(model, p, 5)


@pytest.mark.gpu
def test_gpu_decodes_beside_a_chunk_equal_plain_cpu():
    from engine.sampling_params import SamplingParams

    model = load_model("goldfinch_upgrade_l6_d256", torch.float32, "cuda")
    engine = _mixed_engine(model, True, max_num_batched_tokens=256, max_num_seqs=8)
    prompts = _mixed_prompts(5, (700, 1000))
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert engine.runner.num_split_steps >= 3 and engine.runner.graphs is not None
    cpu_model = load_model("goldfinch_upgrade_l6_d256")
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == greedy_plain(cpu_model, p, 12)


@pytest.mark.gpu
@pytest.mark.parametrize("case_name", ["goldfinch_l6_d128", "goldfinch_upgrade_l6_d256"])
def test_gpu_replayed_chunks_equal_the_plain_step(case_name):
    model = load_model(case_name, torch.float32, "cuda")
    (plain, padded), (s_plain, s_padded), graphs = _chunks_both_ways(
        model, [2048, 5, 700, 1, 128, 1500, 2048], (128, 256, 512, 1024, 2048))
    assert len(graphs._graphs) == 5
    for i, (a, b) in enumerate(zip(plain, padded)):
        assert (a - b).abs().max() < 1e-3, f"chunk {i}"
    for name in ("wkv", "tmix_shift", "cmix_shift"):
        a, b = getattr(s_plain.rnn, name)[:, 0], getattr(s_padded.rnn, name)[:, 0]
        assert (a - b).abs().max() < 1e-3, name


@pytest.mark.gpu
@pytest.mark.parametrize("case_name", ["goldfinch_l6_d128", "goldfinch_upgrade_l6_d256"])
def test_gpu_engine_with_prefill_graphs_equals_plain_cpu(case_name):
    from engine.config_engine import EngineConfig
    from engine.engine import LLMEngine
    from engine.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (3, 300, 256, 1000)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    gpu = LLMEngine(load_model(case_name, torch.float32, "cuda"), None,
                    EngineConfig(cache_tokens=8192, max_num_batched_tokens=256, check_integrity=True,
                                 kv_working_set_bytes=256 << 20, max_num_seqs=4))
    assert gpu.runner.prefill_graphs is not None and gpu.runner.prefill_graphs.buckets == (128, 256)
    outs = [gpu.generate([p], params)[0] for p in prompts]
    assert gpu.runner.prefill_graphs.num_replays >= sum(-(-len(p) // 256) for p in prompts)
    cpu_model = load_model(case_name)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == greedy_plain(cpu_model, p, 8)


def test_sequence_token_range_is_token_at_over_the_range():
    from engine.sequence import Sequence

    seq = Sequence("r", [10, 11, 12, 13], None, seed=0)
    seq.output_token_ids.extend([20, 21])
    for start in range(7):
        for end in range(start, 7):
            assert seq.token_range(start, end) == [seq.token_at(i) for i in range(start, end)], (start, end)


@pytest.mark.gpu
def test_gpu_prefill_steps_never_wait_for_the_gpu():
    """A prompt chunk's step (replay, key write, GOLD layers over a working set) queues its work
    without reading anything back: the host runs ahead while the GPU computes. CUDA's sync debug
    mode raises on any synchronising call inside the prefill steps."""
    from engine.config_engine import EngineConfig
    from engine.engine import LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(load_model("goldfinch_l6_d128", torch.float32, "cuda"), None,
                       EngineConfig(cache_tokens=8192, max_num_batched_tokens=256, kv_working_set_bytes=256 << 20,
                                    max_num_seqs=4))
    execute, checked, armed = engine.runner.execute, [], []

    def execute_without_syncs(sched):
        if armed and any(s.num_new_tokens > 1 for s in sched.scheduled):
            checked.append(len(sched.scheduled))
            torch.cuda.set_sync_debug_mode("error")
        try:
            return execute(sched)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    engine.runner.execute = execute_without_syncs
    gen = torch.Generator().manual_seed(6)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    for n in (300, 1000, 40):
        engine.generate([torch.randint(0, 512, (n,), generator=gen).tolist()], params)  # warm-up: compiles
    armed.append(True)
    for n in (300, 1000, 40):
        engine.generate([torch.randint(0, 512, (n,), generator=gen).tolist()], params)
    assert len(checked) == 2 + 4 + 1  # every chunk of the three prompts
