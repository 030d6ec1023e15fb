"""Decode steps launched ahead of their input tokens (engine.overlap) against the engine that reads
every step's tokens back first: the same tokens, logprobs and finish reasons for every request,
whatever ends it, and the same cache left behind."""
from __future__ import annotations

import random

import pytest

from conftest import load_model
from engine.config_engine import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams

CASE = "goldfinch_l6_d128"


def make_engine(overlap: bool, **kw) -> LLMEngine:
    kw.setdefault("cache_tokens", 4096)
    return LLMEngine(load_model(CASE), None, EngineConfig(check_integrity=True, kv_working_set_page_size=8,
                                                          overlap_decode=overlap, **kw))


def prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(512) for _ in range(n)]


def run(engine: LLMEngine, requests: list[tuple[int, list[int], SamplingParams]], abort: dict[str, int]):
    """Adds each request at its step, aborts `abort[id]` after that many steps; returns what every
    request produced, as (token ids, logprobs, finish reason) per sample."""
    outputs, step = {}, 0
    while step < 500 and (len(outputs) < len(requests) or engine.has_unfinished()):
        for i, (at, ids, params) in enumerate(requests):
            if at == step:
                engine.add_request(ids, params, request_id=f"q{i}")
        for rid, at in abort.items():
            if at == step:
                update = engine.abort(rid)
                if update is not None:
                    outputs[rid] = update.output
        for update in engine.step():
            if update.finished:
                outputs[update.request_id] = update.output
        step += 1
    return {rid: [(o.token_ids, o.finish_reason, o.logprobs) for o in out.outputs] for rid, out in outputs.items()}


def assert_same(got: dict, expected: dict) -> None:
    """Tokens and finish reasons exactly; logprobs to float32 rounding (a request admitted a step
    later runs in differently composed batches)."""
    assert got.keys() == expected.keys()
    for rid in expected:
        assert [o[:2] for o in got[rid]] == [o[:2] for o in expected[rid]], rid
        for g, e in zip(got[rid], expected[rid]):
            if e[2] is None:
                assert g[2] is None
                continue
            for lg, le in zip(g[2], e[2], strict=True):
                assert lg.token_id == le.token_id and abs(lg.logprob - le.logprob) < 1e-5
                assert [t for t, _ in lg.top] == [t for t, _ in le.top]
                assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(lg.top, le.top))


def first_stop_token(ids: list[int]) -> int:
    """A token the greedy continuation of `ids` produces a few tokens in (a stop token then ends
    the request mid-stream, while a step launched ahead of it is in flight)."""
    engine = make_engine(False)
    out = engine.generate([ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    return out.outputs[0].token_ids[4]


def test_overlap_gives_the_same_outputs():
    rng = random.Random(7)
    stop_prompt = prompt(rng, 17)
    requests = [
        (0, prompt(rng, 9), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)),
        (0, prompt(rng, 30), SamplingParams(temperature=0.9, seed=3, max_tokens=25, ignore_eos=True, logprobs=2)),
        (0, stop_prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                        stop_token_ids=[first_stop_token(stop_prompt)])),
        (0, prompt(rng, 12), SamplingParams(temperature=0.7, top_p=0.9, seed=5, max_tokens=20, ignore_eos=True, n=2)),
        (6, prompt(rng, 21), SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)),  # joins mid-stream
        (9, prompt(rng, 5), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                           presence_penalty=0.5)),  # reads its history: never ahead
        (0, prompt(rng, 14), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, min_tokens=3)),
    ]
    abort = {"q6": 13}  # the last request, aborted while steps run ahead
    sync = make_engine(False)
    overlapped = make_engine(True)
    expected = run(sync, requests, abort)
    got = run(overlapped, requests, abort)
    assert_same(got, expected)
    assert len(expected) == len(requests)
    assert expected["q2"][0][1] == "stop" and len(expected["q2"][0][0]) <= 5
    assert expected["q6"][0][1] == "abort" and 0 < len(expected["q6"][0][0]) < 40
    assert sync.stats.overlapped_steps == 0
    assert overlapped.stats.overlapped_steps >= 10
    assert overlapped.stats.generation_tokens == sync.stats.generation_tokens
    for engine in (sync, overlapped):
        engine.check_integrity()
        assert engine.cache.pool.num_used_blocks == 0 and engine.cache.pool.num_used_slots == 0
        assert len(engine.runner.working_sets) == 0 and engine._in_flight is None


def test_overlap_waits_for_tokens_that_can_change_the_next_step():
    """Penalties read the previous tokens and a session's last token must end its state exactly:
    such requests never have a step launched ahead of them."""
    rng = random.Random(1)
    engine = make_engine(True)
    engine.generate([prompt(rng, 10)], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                      frequency_penalty=0.3))
    engine.generate([prompt(rng, 10)], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                    session_ids=[engine.sessions.open().session_id])
    assert engine.stats.overlapped_steps == 0
    engine.generate([prompt(rng, 10)], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert engine.stats.overlapped_steps > 0


def test_a_failing_step_launched_ahead_fails_only_its_requests(monkeypatch):
    rng = random.Random(2)
    engine = make_engine(True)
    calls = {"n": 0}
    real = engine.runner.execute_ahead

    def flaky(sched, token_ids):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected")
        return real(sched, token_ids)

    monkeypatch.setattr(engine.runner, "execute_ahead", flaky)
    out = engine.generate([prompt(rng, 8)], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    assert out.outputs[0].finish_reason == "error" and out.error
    assert 0 < len(out.outputs[0].token_ids) < 20
    # the engine goes on serving
    out = engine.generate([prompt(rng, 8)], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 20
    engine.check_integrity()
    assert engine.cache.pool.num_used_blocks == 0 and engine.cache.pool.num_used_slots == 0


@pytest.mark.parametrize("max_num_seqs", [2, 8])
def test_overlap_with_requests_waiting_for_a_slot(max_num_seqs):
    """With every slot taken, waiting requests do not stop steps running ahead; they are admitted
    as slots free up, and every output equals the synchronous engine's."""
    rng = random.Random(max_num_seqs)
    requests = [(0, prompt(rng, rng.randint(3, 20)),
                 SamplingParams(temperature=0, max_tokens=rng.randint(4, 16), ignore_eos=True)) for _ in range(6)]
    sync, overlapped = make_engine(False, max_num_seqs=max_num_seqs), make_engine(True, max_num_seqs=max_num_seqs)
    assert_same(run(overlapped, requests, {}), run(sync, requests, {}))
    assert overlapped.stats.overlapped_steps > 0
