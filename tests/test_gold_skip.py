"""Prompt chunks before the last skip the GOLD layers: the scheduler ends every chunked prompt with a
chunk of at least `gold_tail_len` tokens, whose GOLD layers then need nothing of earlier chunks.
Chunked prefill stays linear (each history's keys are derived once, in the last chunk) and gives
the same logits."""
from __future__ import annotations

import random

import torch

from conftest import greedy_plain, load_model
from engine.config_engine import EngineConfig
from engine.engine import LLMEngine
from engine.model import StepBatch
from engine.sampling_params import SamplingParams

CASE = "goldfinch_l6_d128"  # 2 GOLD layers: gold_tail_len 5
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def chunks_of(engine: LLMEngine) -> list[list[int]]:
    """Records the tokens each scheduled sequence brings, step by step."""
    seen = []
    execute = engine.runner.execute

    def spy(sched):
        seen.append([s.num_new_tokens for s in sched.scheduled])
        return execute(sched)

    engine.runner.execute = spy
    return seen


def test_last_chunk_of_a_prompt_is_never_shorter_than_the_gold_tail(case):
    model = load_model(case)
    W = model.config.gold_tail_len
    budget = 4 * W
    engine = LLMEngine(model, None, EngineConfig(cache_tokens=2048, max_num_batched_tokens=budget,
                                                 overlap_decode=False, check_integrity=True))
    assert engine.scheduler.config.min_final_chunk == W
    seen = chunks_of(engine)
    n = 2 * budget + W - 2  # plain chunking would leave a last chunk of W - 2 tokens
    out = engine.generate([list(range(1, n + 1))], GREEDY)[0]
    assert [c[0] for c in seen[:3]] == [budget, budget - 2, W]
    assert out.outputs[0].token_ids == greedy_plain(model, list(range(1, n + 1)), 6)


def test_no_rule_when_the_budget_is_under_twice_the_tail():
    model = load_model(CASE)
    engine = LLMEngine(model, None, EngineConfig(cache_tokens=2048, max_num_batched_tokens=2 * model.config.gold_tail_len - 1))
    assert engine.scheduler.config.min_final_chunk == 0 and not engine.runner.skip_gold_on_chunks


def gold_work(budget: int, prompts: list[list[int]]) -> tuple[int, int, list]:
    model = load_model(CASE)
    engine = LLMEngine(model, None, EngineConfig(cache_tokens=4096, max_num_batched_tokens=budget,
                                                 kv_working_set_bytes=0, check_integrity=True))
    model.gold_work.query_rows = model.gold_work.key_rows = 0
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    return model.gold_work.query_rows, model.gold_work.key_rows, [o.outputs[0].token_ids for o in outs]


def test_chunked_prefill_derives_each_history_once():
    """The GOLD work of a prompt fed in chunks equals that of the prompt in one piece: only the last
    chunk runs the GOLD layers, over the whole history. Without the rule (a budget under twice the
    tail) every chunk runs them and re-derives the history so far."""
    rng = random.Random(4)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (90, 57, 130)]
    whole = gold_work(512, prompts)
    chunked = gold_work(16, prompts)
    unskipped = gold_work(9, prompts)
    assert chunked == whole
    assert unskipped[2] == whole[2] and unskipped[1] > 3 * whole[1]


def test_a_sequence_without_logits_gets_nan_and_leaves_the_others_unchanged():
    model = load_model(CASE)
    rng = random.Random(5)
    a, b = [rng.randrange(512) for _ in range(11)], [rng.randrange(512) for _ in range(23)]
    state = model.new_state(2)
    state.keys.set_step_lens([11, 23])
    batch = StepBatch(token_ids=torch.tensor(a + b), query_lens=(11, 23), context_lens=(0, 0),
                      state_slots=torch.arange(2), needs_logits=(True, False))
    logits = model.step(batch, state.rnn, state.keys)
    alone, _ = model.forward(torch.tensor([a]))
    assert torch.isnan(logits[1]).all() and (logits[0] - alone[0]).abs().max() < 1e-5


def test_forward_in_chunks_without_logits_equals_one_piece(case):
    model = load_model(case)
    W = model.config.gold_tail_len
    tokens = torch.randint(0, model.config.vocab_size, (1, 13 + 7 + W), generator=torch.Generator().manual_seed(1))
    whole, _ = model.forward(tokens)
    out, state = model.forward(tokens[:, :13], logits=False)
    assert out is None
    _, state = model.forward(tokens[:, 13:20], state, logits=False)
    last, _ = model.forward(tokens[:, 20:], state)
    assert (last - whole).abs().max() < 1e-4


def test_a_session_cancelled_mid_prompt_never_keeps_a_state_its_gold_layers_lag():
    """A chunk that skipped the GOLD layers leaves their token-shift state behind the Finch layers'.
    A session whose request is cancelled after such a chunk must not keep that state: a follow-up
    shorter than the GOLD tail would read it. (It starts over instead, and gets the same tokens.)"""
    model = load_model(CASE)
    engine = LLMEngine(model, None, EngineConfig(cache_tokens=4096, max_num_batched_tokens=16, check_integrity=True))
    rng = random.Random(6)
    prompt = [rng.randrange(512) for _ in range(60)]
    sid = engine.sessions.open().session_id
    rid = engine.add_request(prompt, GREEDY, session_id=sid)
    engine.step()
    engine.step()  # two chunks of 16, both without GOLD layers
    engine.abort(rid)
    follow_up = prompt[:32] + [7, 8]  # extends what was computed by two tokens: one short chunk
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logprobs=1)
    out = engine.generate([follow_up], params, session_ids=[sid])[0]
    logits, _ = model.forward(torch.tensor([follow_up]))
    expected = torch.log_softmax(logits[0].double(), -1)
    first = out.outputs[0].logprobs[0]
    assert abs(first.logprob - expected[first.token_id].item()) < 1e-4
    assert out.num_cached_tokens == 0
