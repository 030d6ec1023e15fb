"""Sessions: the next turn prefills only new tokens, survives host eviction and a file round trip."""
from __future__ import annotations

import pytest

from conftest import load_model
from engine.config_engine import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.session_file import SessionFileError
from engine.sessions import SessionError
from test_engine import GREEDY, assert_idle, make_engine, prompts

TURN1 = prompts(1, seed=20, lo=25, hi=25)[0]
TURN2_NEW = prompts(1, seed=21, lo=9, hi=9)[0]


def two_turns(engine: LLMEngine, sid: str = "conv-1", restore=None):
    first = engine.generate([TURN1], GREEDY, session_ids=[sid])[0]
    if restore:
        engine, sid = restore(engine, sid)
    conversation = TURN1 + first.outputs[0].token_ids + TURN2_NEW
    computed_before = engine.stats.prompt_tokens_computed
    second = engine.generate([conversation], GREEDY, session_ids=[sid])[0]
    prefilled = engine.stats.prompt_tokens_computed - computed_before
    fresh = make_engine().generate([conversation], GREEDY)[0]
    return first, second, fresh, prefilled, conversation, engine


def test_second_turn_prefills_only_new_tokens():
    engine = make_engine()
    first, second, fresh, prefilled, conversation, _ = two_turns(engine)
    reused = len(TURN1) + len(first.outputs[0].token_ids)  # the session covers every token
    assert second.num_cached_tokens == second.usage.cached_tokens == reused
    assert prefilled == len(conversation) - reused
    assert second.outputs[0].token_ids == fresh.outputs[0].token_ids
    assert_idle(engine)


def test_session_survives_eviction_to_host():
    engine = make_engine(cache_tokens=160, block_size=8, num_slots=2, max_num_seqs=2)

    def crowd_out(engine, sid):
        engine.generate(prompts(3, seed=22, lo=30, hi=40), GREEDY)  # needs the session's slot and blocks
        assert engine.sessions.get(sid).location == "host"
        return engine, sid

    first, second, fresh, _, _, engine = two_turns(engine, restore=crowd_out)
    assert engine.sessions.num_evicted_to_host >= 1
    assert second.outputs[0].token_ids == fresh.outputs[0].token_ids
    assert second.num_cached_tokens > 0
    assert_idle(engine)


def test_saved_session_restores_in_a_new_engine(tmp_path):
    path = tmp_path / "conv.session"

    def save_and_restart(engine, sid):
        size = engine.save_session(sid, str(path))
        assert size > 0
        new = make_engine()
        assert new.restore_session(str(path)).session_id == sid
        return new, sid

    first, second, fresh, prefilled, conversation, engine = two_turns(make_engine(), restore=save_and_restart)
    assert second.num_cached_tokens == len(TURN1) + len(first.outputs[0].token_ids)
    assert second.outputs[0].token_ids == fresh.outputs[0].token_ids
    assert_idle(engine)


def test_corrupted_or_truncated_files_are_refused(tmp_path):
    engine = make_engine()
    engine.generate([TURN1], GREEDY, session_ids=["s"])
    path = tmp_path / "s.session"
    engine.save_session("s", str(path))
    data = path.read_bytes()
    (tmp_path / "truncated").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[20] ^= 0xFF  # inside the JSON header
    (tmp_path / "flipped").write_bytes(bytes(flipped))
    (tmp_path / "garbage").write_bytes(b"not a session at all")
    for name in ("truncated", "flipped", "garbage", "missing"):
        with pytest.raises(SessionFileError):
            make_engine().restore_session(str(tmp_path / name))
    other = LLMEngine(load_model("goldfinch_rope_l6_d128"), None, EngineConfig(cache_tokens=256))
    with pytest.raises(SessionFileError, match="another model"):
        other.restore_session(str(path))


def test_a_prompt_that_does_not_extend_the_session_starts_fresh():
    engine = make_engine()
    engine.generate([TURN1], GREEDY, session_ids=["s"])
    diverged = TURN1[:10] + TURN2_NEW
    out = engine.generate([diverged], GREEDY, session_ids=["s"])[0]
    assert out.num_cached_tokens == 0
    assert out.outputs[0].token_ids == make_engine().generate([diverged], GREEDY)[0].outputs[0].token_ids
    assert_idle(engine)


def test_sessions_are_scoped_to_their_owner_and_closable():
    engine = make_engine()
    engine.add_request(TURN1, GREEDY, session_id="mine", owner="key-a")
    with pytest.raises(SessionError, match="in use"):
        engine.add_request(TURN1, GREEDY, session_id="mine", owner="key-a")
    while engine.has_unfinished():
        engine.step()
    with pytest.raises(SessionError, match="no session 'mine'"):
        engine.add_request(TURN1 + [1], GREEDY, session_id="mine", owner="key-b")
    with pytest.raises(SessionError):
        engine.sessions.close("mine", owner="key-b")
    assert engine.cache.pool.num_used_slots == 1
    engine.sessions.close("mine", owner="key-a")
    assert engine.cache.pool.num_used_slots == 0 and engine.cache.pool.num_used_blocks == 0
    assert engine.sessions.open().session_id != engine.sessions.open().session_id


def test_host_budget_drops_least_recently_used_sessions():
    engine = make_engine(cache_tokens=64, block_size=8, num_slots=1, max_num_seqs=1, session_host_bytes=200_000)
    for i in range(4):
        engine.generate([prompts(1, seed=30 + i, lo=12, hi=12)[0]], SamplingParams(temperature=0, max_tokens=2),
                        session_ids=[f"s{i}"])
    # each session's RNN state is ~137 KB in float32: at most one fits on the host beside the device one
    assert engine.sessions.host_bytes() <= 200_000
    assert engine.sessions.num_dropped >= 2
    assert "s3" in engine.sessions
    engine.check_integrity()
