"""The engine on the CPU in float32: batching, chunking, preemption, cancellation, accounting."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import greedy_plain, load_model
from engine.config_engine import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams

CASE = "goldfinch_l6_d128"
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def make_engine(**kw) -> LLMEngine:
    kw.setdefault("cache_tokens", 4096)
    kw.setdefault("check_integrity", True)
    return LLMEngine(load_model(CASE), None, EngineConfig(**kw))


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def alone(prompt: list[int], max_tokens: int = 12) -> list[int]:
    """Greedy tokens from the plain (unpaged, unbatched) model path."""
    return greedy_plain(load_model(CASE), prompt, max_tokens)


def assert_idle(engine: LLMEngine) -> None:
    engine.check_integrity()
    pool = engine.cache.pool
    assert not engine.requests and not engine.scheduler.running and not engine.scheduler.waiting
    assert pool.num_used_blocks == sum(len(s.block_table) for s in engine.sessions.device_owners())
    assert pool.num_used_slots == len(engine.sessions.device_owners())


def test_batched_equals_alone():
    ps = prompts(6, seed=1)
    engine = make_engine()
    outs = engine.generate(ps, GREEDY)
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == alone(p)
        assert o.outputs[0].finish_reason == "length"
    assert_idle(engine)


def test_arrivals_while_decoding_and_chunked_prefill():
    """Prompts join at different steps and are prefilled in chunks of a small token budget."""
    ps = prompts(5, seed=2, lo=20, hi=60)
    engine = make_engine(max_num_batched_tokens=16)
    ids, done = [], {}
    for step in range(400):
        if step % 3 == 0 and len(ids) < len(ps):
            ids.append(engine.add_request(ps[len(ids)], GREEDY))
        for u in engine.step():
            if u.finished:
                done[u.request_id] = u.output
        if len(done) == len(ps):
            break
    for p, rid in zip(ps, ids):
        assert done[rid].outputs[0].token_ids == alone(p)
    assert engine.stats.prompt_tokens_computed == sum(map(len, ps))
    assert_idle(engine)


def test_preemption_under_a_tiny_pool_changes_nothing():
    ps = prompts(6, seed=3, lo=10, hi=30)
    engine = make_engine(cache_tokens=96, block_size=8, max_num_seqs=4, num_slots=3)
    outs = engine.generate(ps, GREEDY)
    assert engine.stats.preemptions > 0, "the pool was meant to force preemption"
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == alone(p)
    assert_idle(engine)


def test_cancel_frees_blocks_and_slot_at_once():
    engine = make_engine()
    keep = engine.add_request(prompts(1, seed=4)[0], GREEDY)
    gone = engine.add_request(prompts(1, seed=5)[0], SamplingParams(temperature=0, max_tokens=50))
    engine.step()
    engine.step()
    used = engine.cache.pool.num_used_blocks
    seq = engine.requests[gone].seqs[0]
    held = len(seq.block_table)
    update = engine.abort(gone)
    assert update.finished and update.output.outputs[0].finish_reason == "abort"
    assert engine.cache.pool.num_used_blocks == used - held and seq.state_slot is None
    engine.check_integrity()
    while engine.has_unfinished():
        engine.step()
    assert keep not in engine.requests
    assert_idle(engine)


def test_cancel_while_preempted_or_waiting():
    engine = make_engine(cache_tokens=64, block_size=8, num_slots=2, max_num_seqs=2)
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
           for p in prompts(4, seed=6, lo=10, hi=20)]
    for _ in range(6):
        engine.step()
    for rid in ids:
        engine.abort(rid)
    assert_idle(engine)


def test_requests_that_can_never_fit_are_rejected_up_front():
    engine = make_engine(max_model_len=64, cache_tokens=48, block_size=8)
    with pytest.raises(ValueError, match="^prompt: .*context limit of 64"):
        engine.add_request(list(range(60)), SamplingParams(max_tokens=5))
    with pytest.raises(ValueError, match="^prompt: .*never fit the compressed-key pool"):
        engine.add_request(list(range(40)), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="^prompt: token id 600"):
        engine.add_request([1, 600], SamplingParams())
    with pytest.raises(ValueError, match="^prompt: must contain"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="^stop: "):
        engine.add_request([1, 2], SamplingParams(stop=("x",)))
    assert not engine.requests


def test_pool_bytes_per_token_from_the_allocation():
    engine = make_engine()
    cfg = engine.model.config
    assert engine.cache.persistent_bytes_per_token() == cfg.n_embd // 16 * 4 + 4  # float32 keys + int32 id
    bf16 = LLMEngine(load_model(CASE, torch.bfloat16), None, EngineConfig(cache_tokens=64))
    assert bf16.cache.persistent_bytes_per_token() == cfg.n_embd // 16 * 2 + 4


def test_seeded_sampling_is_reproducible_and_batch_independent():
    p = prompts(1, seed=7)[0]
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=10, ignore_eos=True)
    a = make_engine().generate([p], params)[0].outputs[0].token_ids
    others = prompts(4, seed=8)
    mixed = make_engine().generate(others[:2] + [p] + others[2:],
                                   [SamplingParams(temperature=1.0, max_tokens=7)] * 2 + [params]
                                   + [SamplingParams(temperature=0.5, seed=9, max_tokens=13)] * 2)
    assert mixed[2].outputs[0].token_ids == a
    different = make_engine().generate([p], SamplingParams(temperature=0.9, top_p=0.95, seed=4321, max_tokens=10,
                                                           ignore_eos=True))[0].outputs[0].token_ids
    assert different != a


def test_n_samples_share_the_prompt_blocks():
    engine = make_engine(block_size=4)
    p = prompts(1, seed=9, lo=17, hi=17)[0]
    rid = engine.add_request(p, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True))
    while not engine.requests[rid].forked:
        engine.step()
    seqs = engine.requests[rid].seqs
    assert len(seqs) == 3
    full_blocks = len(p) // 4  # the prompt's full blocks are shared by all three samples
    shared = set(seqs[0].block_table[:full_blocks])
    assert all(set(s.block_table[:full_blocks]) == shared for s in seqs)
    assert all(engine.cache.pool.ref_count(b) == 3 for b in shared)
    assert len({s.state_slot for s in seqs}) == 3
    out = None
    while engine.has_unfinished():
        for u in engine.step():
            out = u.output
    texts = [o.token_ids for o in out.outputs]
    assert len(texts) == 3 and all(len(t) == 6 for t in texts) and len(set(map(tuple, texts))) > 1
    # each sample equals a run with its own seed from the same prompt: forks lose nothing
    assert_idle(engine)


def test_failed_step_fails_only_its_requests():
    engine = make_engine()
    a = engine.add_request(prompts(1, seed=10)[0], GREEDY)
    model = engine.runner.model
    original = model.step

    def broken(*args, **kw):
        raise RuntimeError("injected fault")

    model.step = broken
    try:
        updates = engine.step()
    finally:
        model.step = original
    assert [u.output.outputs[0].finish_reason for u in updates] == ["error"]
    assert updates[0].output.error and a not in engine.requests
    b = engine.add_request(prompts(1, seed=11)[0], GREEDY)
    out = engine.generate([prompts(1, seed=12)[0]], GREEDY)[0]
    assert out.outputs[0].token_ids == alone(prompts(1, seed=12)[0])
    while engine.has_unfinished():
        engine.step()
    assert b not in engine.requests
    assert_idle(engine)


@pytest.mark.parametrize("case", ["goldfinch_l6_d128", "goldfinch_rope_l6_d128", "goldfinch_upgrade_l6_d256"])
@pytest.mark.parametrize("pages", [0, 6, 4096])
@pytest.mark.parametrize("fast_path", [True, False])
def test_kv_working_sets_change_nothing(case, pages, fast_path):
    """Materialised per-layer K/V (all, some sequences, none: derive every step), decoded through the
    static decode step or the general step, give the plain path's tokens; 5 pages of 8 tokens hold a
    set or two, so sets are refused and dropped as sequences grow."""
    model = load_model(case)
    mc = model.config
    page_bytes = 8 * 2 * mc.n_gold * mc.dim_att * 4  # float32
    engine = LLMEngine(model, None, EngineConfig(cache_tokens=4096, check_integrity=True, kv_working_set_page_size=8,
                                                 kv_working_set_bytes=pages * page_bytes, max_num_batched_tokens=32,
                                                 decode_fast_path=fast_path))
    ps = prompts(4, seed=40, lo=5, hi=50)
    outs = engine.generate(ps, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == greedy_plain(model, p, 8)
    ws = engine.runner.working_sets
    assert (ws is None) == (pages == 0)
    if ws is not None:
        assert ws.num_pages == pages - 1 and ws.num_created > 0 and ws.num_free_pages == ws.num_pages
        if pages == 6:
            assert ws.num_dropped_over_budget > 0
    if fast_path and pages == 4096:
        assert engine.runner.num_fast_steps > 0
    if not fast_path or pages == 0:
        assert engine.runner.num_fast_steps == 0




def _general_steps_with_sets_match_plain(model) -> None:
    """Three prompts in chunks of 32 tokens, then decodes, all through the general step with K/V
    working sets (pages of 8): the plain path's greedy tokens."""
    mc = model.config
    engine = LLMEngine(model, None, EngineConfig(cache_tokens=4096, check_integrity=True, kv_working_set_page_size=8,
                                                 kv_working_set_bytes=512 * 8 * 2 * mc.n_gold * mc.dim_att * 4,
                                                 max_num_batched_tokens=32, decode_fast_path=False))
    ps = prompts(3, seed=41, lo=20, hi=50)
    outs = engine.generate(ps, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == greedy_plain(model, p, 6)


def test_working_set_rows_derived_by_the_fused_derivation(monkeypatch):
    """Without rotary, sets' keys and values are derived and stored by `kernels.dispatch.gold_kv_derive`
    (its reference on the CPU), rows of several sequences packed: the plain path's tokens."""
    import engine.gold_keys as gold_keys

    calls = []
    fused = gold_keys.gold_kv_derive

    def spy(*args):
        calls.append((args[0].shape[0], int((args[5] >= 0).sum())))
        return fused(*args)

    monkeypatch.setattr(gold_keys, "gold_kv_derive", spy)
    _general_steps_with_sets_match_plain(load_model("goldfinch_l6_d128"))
    assert calls and any(stored == rows for rows, stored in calls)  # a rebuilt set: every row stored
    assert any(stored < rows for rows, stored in calls)  # a tail: its first row only feeds the shift


@pytest.mark.parametrize("case", ["goldfinch_rope_l6_d128"])
def test_working_set_rows_derived_in_pieces_change_nothing(case, monkeypatch):
    """Sets' rows derived in pieces (`gold_keys.DERIVE_PIECE_ROWS`, here 5 rows) give the plain
    path's tokens through the general step (with rotary: without, the fused derivation runs)."""
    import engine.gold_keys as gold_keys

    monkeypatch.setattr(gold_keys, "DERIVE_PIECE_ROWS", 5)
    pieced = []
    packed = gold_keys.StepKeys._packed_keys_values

    def spy(self, w):
        pieced.append(self.proto.shape[0] > 5)
        return packed(self, w)

    monkeypatch.setattr(gold_keys.StepKeys, "_packed_keys_values", spy)
    _general_steps_with_sets_match_plain(load_model(case))
    assert any(pieced)
