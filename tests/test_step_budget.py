"""The step's token budget: `max_num_batched_tokens` while a sequence decodes, the larger
`prefill_only_batched_tokens` while none does (a prompt alone runs in fewer, longer chunks)."""
from __future__ import annotations

import random

import pytest

from conftest import greedy_plain, load_model
from engine.config_engine import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerConfig

CASE = "goldfinch_l6_d128"  # gold_tail_len 5: a chunked prompt's last chunk has >= 5 tokens
BUDGET, PREFILL_ONLY = 16, 48


def engine_with_spy(**kw) -> tuple[LLMEngine, list[list[int]]]:
    """An engine whose steps are recorded as the tokens each scheduled sequence brings."""
    config = EngineConfig(cache_tokens=4096, max_num_batched_tokens=BUDGET, prefill_only_batched_tokens=PREFILL_ONLY,
                          overlap_decode=False, check_integrity=True, **kw)
    engine = LLMEngine(load_model(CASE), None, config)
    seen: list[list[int]] = []
    execute = engine.runner.execute

    def spy(sched):
        seen.append([s.num_new_tokens for s in sched.scheduled])
        return execute(sched)

    engine.runner.execute = spy
    return engine, seen


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(512) for _ in range(n)]


def run_until_done(engine: LLMEngine, ids: list[str]) -> dict[str, list[int]]:
    done = {}
    while engine.has_unfinished():
        for u in engine.step():
            if u.finished:
                done[u.request_id] = u.output.outputs[0].token_ids
    return {rid: done[rid] for rid in ids}


def test_a_prompt_alone_runs_in_prefill_only_chunks_then_a_new_prompt_in_small_ones():
    engine, seen = engine_with_spy()
    assert engine.scheduler.config.min_final_chunk == 5
    a, b = tokens(100, 1), tokens(60, 2)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = engine.add_request(a, greedy)
    for _ in range(3):
        engine.step()
    # 100 = 48 + 47 + 5: the budget of 48, then one token less so the last chunk holds the GOLD tail
    assert seen == [[48], [47], [5]]
    second = engine.add_request(b, greedy)  # `a` decodes now: steps of 16, its token included
    engine.step()
    assert seen[3] == [1, 15]
    out = run_until_done(engine, [first, second])
    assert seen[4:7] == [[1, 15], [1, 15], [1, 15]]
    assert out[first] == greedy_plain(load_model(CASE), a, 8)
    assert out[second] == greedy_plain(load_model(CASE), b, 8)


def test_prompts_arriving_together_share_the_prefill_only_budget():
    engine, seen = engine_with_spy()
    prompts = [tokens(30, 3), tokens(30, 4)]
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    ids = [engine.add_request(p, greedy) for p in prompts]
    out = run_until_done(engine, ids)
    # 30 + 18 in the first step; the first then decodes, so the second's last 12 come with its token
    assert seen[:2] == [[30, 18], [1, 12]]
    for p, rid in zip(prompts, ids):
        assert out[rid] == greedy_plain(load_model(CASE), p, 4)


def test_without_it_every_step_has_the_small_budget():
    engine, seen = engine_with_spy()
    engine.scheduler.config = SchedulerConfig(max_num_batched_tokens=BUDGET, min_final_chunk=5)
    engine.add_request(tokens(40, 5), SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    assert seen == [[16], [16], [8]]


def test_the_longest_step_is_the_larger_budget():
    assert SchedulerConfig(max_num_batched_tokens=2048, prefill_only_batched_tokens=8192).max_step_tokens == 8192
    assert SchedulerConfig(max_num_batched_tokens=4096, prefill_only_batched_tokens=1024).max_step_tokens == 4096
    assert SchedulerConfig(max_num_batched_tokens=2048).max_step_tokens == 2048


def test_a_negative_budget_is_a_named_error():
    with pytest.raises(ValueError, match="^prefill_only_batched_tokens"):
        EngineConfig(prefill_only_batched_tokens=-1)
