"""The static decode step (what CUDA graphs replay) against the general step, on the CPU."""
from __future__ import annotations

import random

import pytest
import torch

import engine.model_runner as model_runner
from conftest import load_model
from engine import layers as L
from engine.config_engine import EngineConfig
from engine.cuda_graphs import host_inputs, to_inputs
from engine.engine import LLMEngine
from engine.layer_ops import MIN_COMPILED_TOKENS, LayerOps
from engine.sampling_params import SamplingParams


def decoding_engine(case: str, fast: bool) -> LLMEngine:
    """Three sequences of uneven length, all decoding with complete working sets."""
    engine = LLMEngine(load_model(case), None, EngineConfig(cache_tokens=2048, kv_working_set_page_size=8,
                                                            decode_fast_path=fast, check_integrity=True,
                                                            overlap_decode=False))  # steps driven by hand below
    rng = random.Random(3)
    for n in (5, 23, 40):
        engine.add_request([rng.randrange(512) for _ in range(n)],
                           SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert all(not s.is_prefilling for s in engine.scheduler.running)
    return engine


@pytest.mark.parametrize("case", ["goldfinch_l6_d128", "goldfinch_rope_l6_d128", "goldfinch_upgrade_l6_d256"])
def test_padded_static_step_equals_general_step(case, monkeypatch):
    """Logits of a decode step through the static step, padded to 8 rows whose scratch writes must
    touch nothing of the real rows, equal the general step's; so do the states and caches after."""
    fast, general = decoding_engine(case, True), decoding_engine(case, False)

    def padded(step, rows, scratch, device, token_ids=None):
        cols, tables = host_inputs(rows, 8, 6, scratch)
        return step.with_greedy(to_inputs(cols.to(device), tables.to(device))).rows(rows.size)

    monkeypatch.setattr(model_runner, "run_eager", padded)
    for _ in range(3):
        steps_before = fast.runner.num_fast_steps
        logits_fast = fast.runner.execute(fast.scheduler.schedule()).logits.float()
        logits_general = general.runner.execute(general.scheduler.schedule()).logits.float()
        assert fast.runner.num_fast_steps == steps_before + 1 and general.runner.num_fast_steps == 0
        assert (logits_fast - logits_general).abs().max() < 1e-4
        for row, (seq_f, seq_g) in enumerate(zip(fast.scheduler.running, general.scheduler.running)):
            token = int(logits_general[row].argmax())  # both go on with the same token
            seq_f.output_token_ids.append(token)
            seq_g.output_token_ids.append(token)
    for name in ("wkv", "tmix_shift", "cmix_shift"):
        a = getattr(fast.cache.rnn, name)[:, :-1]  # the last slot is scratch
        b = getattr(general.cache.rnn, name)[:, :-1]
        assert (a - b).abs().max() < 1e-4, name
    for seq_f, seq_g in zip(fast.scheduler.running, general.scheduler.running):
        n = seq_f.num_computed_tokens
        ck_f, ids_f = fast.cache.keys.read(seq_f.block_table, n)
        ck_g, ids_g = general.cache.keys.read(seq_g.block_table, n)
        assert torch.equal(ids_f, ids_g) and (ck_f - ck_g).abs().max() < 1e-4


def test_layer_ops_compile_only_large_steps():
    plain = LayerOps(False)
    assert plain.eager is plain and plain.for_tokens(1 << 20) is plain
    assert plain.finch_tmix_in is L.finch_tmix_in
    compiled = LayerOps(True)  # torch.compile wraps lazily: nothing is compiled until called
    assert compiled.for_tokens(MIN_COMPILED_TOKENS) is compiled
    assert compiled.for_tokens(MIN_COMPILED_TOKENS - 1) is compiled.eager
    assert compiled.eager.channel_mix is L.channel_mix and compiled.channel_mix is not L.channel_mix


def test_compile_threshold_knob(monkeypatch):
    from engine.layer_ops import MIN_COMPILED_ENV_VAR

    monkeypatch.setenv(MIN_COMPILED_ENV_VAR, "4096")
    compiled = LayerOps(True)
    assert compiled.for_tokens(4096) is compiled and compiled.for_tokens(4095) is compiled.eager
    monkeypatch.setenv(MIN_COMPILED_ENV_VAR, "lots")
    with pytest.raises(ValueError, match=MIN_COMPILED_ENV_VAR):
        LayerOps(True)


def test_compile_shapes_knob(monkeypatch):
    from engine.layer_ops import SHAPES_ENV_VAR

    for mode in ("auto", "dynamic"):
        monkeypatch.setenv(SHAPES_ENV_VAR, mode)
        assert LayerOps(True).compiled
    monkeypatch.setenv(SHAPES_ENV_VAR, "static")
    with pytest.raises(ValueError, match=SHAPES_ENV_VAR):
        LayerOps(True)


def test_prompt_steps_derive_every_gold_layer_in_one_call(monkeypatch):
    """With working sets, a prompt's keys and values of all GOLD layers come from one stacked
    derivation call (`gold_keys.STACKED_DERIVE_ROWS`); logits, pools and states equal one call per
    layer's."""
    import engine.gold_keys as gold_keys

    calls: list[int] = []
    logits: list[torch.Tensor] = []
    real_derive, real_execute = gold_keys.gold_kv_derive, model_runner.ModelRunner.execute

    def spy(*args):
        calls.append(args[4].maa_w1.shape[0] if args[4].maa_w1.dim() == 3 else 1)
        return real_derive(*args)

    def recorded(self, sched):
        out = real_execute(self, sched)
        logits.append(out.logits)
        return out

    monkeypatch.setattr(gold_keys, "gold_kv_derive", spy)
    monkeypatch.setattr(model_runner.ModelRunner, "execute", recorded)
    stacked = decoding_engine("goldfinch_l6_d128", True)
    n_gold = stacked.model.config.n_gold
    assert calls and all(n == n_gold for n in calls)
    stacked_logits = list(logits)
    calls.clear()
    logits.clear()
    monkeypatch.setattr(gold_keys, "STACKED_DERIVE_ROWS", 0)
    per_layer = decoding_engine("goldfinch_l6_d128", True)
    assert calls and all(n == 1 for n in calls)
    assert len(logits) == len(stacked_logits) and all(torch.equal(x, y) for x, y in zip(logits, stacked_logits))
    a, b = stacked, per_layer
    assert [s.output_token_ids for s in a.scheduler.running] == [s.output_token_ids for s in b.scheduler.running]
    pa, pb = a.runner.working_sets.pool, b.runner.working_sets.pool
    for seq_a, seq_b in zip(a.scheduler.running, b.scheduler.running):
        ws_a, ws_b = a.runner.working_sets.get(seq_a), b.runner.working_sets.get(seq_b)
        assert ws_a.length == ws_b.length > 0
        for j in range(n_gold):
            ka, va = pa.gather(j, ws_a.pages, ws_a.length)
            kb, vb = pb.gather(j, ws_b.pages, ws_b.length)
            assert torch.equal(ka, kb) and torch.equal(va, vb)
    assert torch.equal(a.cache.rnn.wkv, b.cache.rnn.wkv)


def test_decompress_rows_are_the_models_decompress():
    """`decode_ops.decode_decompress_rows` (gathers, embedding, norms and the decompression product
    in one function, compiled in the decode step) gives `GoldFinchModel.decompress` of the previous
    rows then the new ones, exactly (eager)."""
    from engine.decode_ops import decode_decompress_rows

    model = load_model("goldfinch_l6_d128")
    cfg, g = model.config, torch.Generator().manual_seed(4)
    flat_keys = torch.randn(40, cfg.compressed_dim, generator=g).to(model.dtype)
    flat_ids = torch.randint(0, cfg.vocab_size, (40,), generator=g, dtype=torch.int32)
    prev_slots, ids = torch.tensor([7, 0, 31]), torch.tensor([5, 9, 2])
    compressed = torch.randn(3, cfg.compressed_dim, generator=g).to(model.dtype)
    proto, values = decode_decompress_rows(flat_keys, flat_ids, prev_slots, compressed, ids, model.emb, *model.ln0,
                                           model.w_decompress)
    want = model.decompress(torch.cat([flat_keys[prev_slots], compressed]), torch.cat([flat_ids[prev_slots].long(), ids]))
    assert torch.equal(proto, want[0]) and torch.equal(values, want[1])
