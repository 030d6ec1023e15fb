"""Linear prefill: only the tail positions go through the GOLD layers, chunking changes nothing."""
from __future__ import annotations

import pytest
import torch

from conftest import load_model


def _tokens(model, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (1, n), generator=g)


def test_linear_prefill_last_logits_equal_full_forward(case):
    model = load_model(case)
    tokens = _tokens(model, 70)
    tail, _ = model.forward(tokens)
    full, _ = model.forward(tokens, all_logits=True)
    assert torch.allclose(tail[0], full[0, -1], atol=1e-5)


def test_linear_prefill_state_equals_full_forward_state(case):
    """The carried state after a tail-only prefill continues exactly like the full pass's."""
    model = load_model(case)
    tokens = _tokens(model, 40, seed=1)
    _, tail_state = model.forward(tokens[:, :-1])
    _, full_state = model.forward(tokens[:, :-1], all_logits=True)
    a, _ = model.forward(tokens[:, -1:], tail_state)
    b, _ = model.forward(tokens[:, -1:], full_state)
    assert torch.allclose(a, b, atol=1e-5)
    for name in ("wkv", "tmix_shift", "cmix_shift"):
        assert torch.allclose(getattr(tail_state.rnn, name), getattr(full_state.rnn, name), atol=1e-5), name


def test_gold_work_grows_linearly(case):
    """GOLD query rows stay constant in T and attended keys grow linearly (not quadratically)."""
    model = load_model(case)
    counts = {}
    for T in (64, 128, 256):
        model.gold_work.query_rows = model.gold_work.key_rows = 0
        model.forward(_tokens(model, T))
        counts[T] = (model.gold_work.query_rows, model.gold_work.key_rows)
    n_gold = model.config.n_gold
    # layer j computes 2 * (n_gold - 1 - j) + 2 query rows (one extra for the next layer's shift)
    expected_rows = sum(2 * (n_gold - 1 - j) + 2 for j in range(n_gold))
    assert counts[64][0] == counts[128][0] == counts[256][0] == expected_rows
    assert counts[64][1] == expected_rows * 64 and counts[256][1] == expected_rows * 256
    # a full forward computes every position at every GOLD layer: quadratic attention
    model.gold_work.query_rows = model.gold_work.key_rows = 0
    model.forward(_tokens(model, 64), all_logits=True)
    assert model.gold_work.query_rows == 64 * n_gold


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_equals_one_pass(case, chunk):
    model = load_model(case)
    tokens = _tokens(model, 100, seed=2)
    one_pass, one_state = model.forward(tokens)
    state, logits = None, None
    for start in range(0, tokens.shape[1], chunk):
        logits, state = model.forward(tokens[:, start:start + chunk], state)
    assert torch.allclose(logits, one_pass, atol=1e-5), f"chunk {chunk}: {(logits - one_pass).abs().max()}"
    for name in ("wkv", "tmix_shift", "cmix_shift"):
        assert torch.allclose(getattr(state.rnn, name), getattr(one_state.rnn, name), atol=1e-4), name
    assert torch.equal(state.keys.read(0)[1], one_state.keys.read(0)[1])
    assert torch.allclose(state.keys.read(0)[0], one_state.keys.read(0)[0], atol=1e-5)


def test_chunk_over_cache_is_end_aligned_causal(case):
    """Every logit of a multi-token chunk over an existing cache equals the full pass's logit at
    that position (the reference's chunked path gets this wrong)."""
    model = load_model(case)
    tokens = _tokens(model, 30, seed=3)
    full, _ = model.forward(tokens, all_logits=True)
    _, state = model.forward(tokens[:, :20])
    chunk, _ = model.forward(tokens[:, 20:], state, all_logits=True)
    assert torch.allclose(chunk[0], full[0, 20:], atol=1e-5)


def test_persistent_state_is_compressed(case):
    model = load_model(case)
    _, state = model.forward(_tokens(model, 33))
    cfg = model.config
    compressed, ids = state.keys.read(0)
    assert compressed.shape == (33, cfg.n_embd // 16) and ids.shape == (33,)
    assert state.persistent_bytes_per_token() == cfg.n_embd // 16 * 4 + 4  # float32 + int32 id


def test_histories_decompressed_per_layer_equal_held_ones(case, monkeypatch):
    """Past `DECOMPRESSED_ROWS_LIMIT` rows a step decompresses each history again in every layer
    instead of holding them all: the same arithmetic, the same logits (a batch of uneven
    histories, continued by a multi-token chunk and a decode step)."""
    import engine.gold_keys as gold_keys

    model = load_model(case)
    tokens = _tokens(model, 48, seed=7).repeat(3, 1)
    results = []
    piece = gold_keys.DERIVE_PIECE_ROWS
    # then histories derived in pieces (`DERIVE_PIECE_ROWS`), held or decompressed piece by piece
    for limit, rows in ((gold_keys.DECOMPRESSED_ROWS_LIMIT, piece), (0, piece), (1 << 18, 5), (0, 7), (0, 1)):
        monkeypatch.setattr(gold_keys, "DECOMPRESSED_ROWS_LIMIT", limit)
        monkeypatch.setattr(gold_keys, "DERIVE_PIECE_ROWS", rows)
        a, state = model.forward(tokens[:, :30])
        b, state = model.forward(tokens[:, 30:47], state)
        c, state = model.forward(tokens[:, 47:], state)
        results.append(torch.cat([a, b, c]))
    assert torch.equal(results[0], results[1])
    for other in results[2:]:
        assert torch.allclose(results[0], other, atol=1e-5, rtol=0)


def _steps_over_carried_states(model, shift_inside: bool):
    """Two one-sequence steps (a prompt, then a chunk) and a packed step of three sequences, over
    random carried states."""
    from engine.layer_ops import LayerOps
    from engine.model import StepBatch

    model.ops = LayerOps(False, shift_inside=shift_inside)
    calls = []
    shifted = model.ops.finch_tmix_projections_shifted
    model.ops.finch_tmix_projections_shifted = lambda *a: calls.append(1) or shifted(*a)
    gen = torch.Generator().manual_seed(5)
    one, three = model.new_state(1), model.new_state(3)
    for state in (one, three):
        for t in (state.rnn.wkv, state.rnn.tmix_shift, state.rnn.cmix_shift):
            t.copy_(0.5 * torch.randn(t.shape, generator=gen))
    logits = []
    for q, state in (((23,), one), ((5,), one), ((5, 1, 17), three)):
        context = tuple(state.keys.length(i) for i in range(len(q)))
        state.keys.set_step_lens(list(q))
        batch = StepBatch(token_ids=torch.randint(0, model.config.vocab_size, (sum(q),), generator=gen),
                          query_lens=q, context_lens=context, state_slots=torch.arange(len(q)))
        logits.append(model.step(batch, state.rnn, state.keys))
    state = (one, three)
    return logits, state, len(calls)


def test_token_shift_inside_the_layer_functions_is_the_same_arithmetic(case):
    """The compiled prefill's Finch blocks read a single sequence's token shift inside the layer
    functions (`LayerOps.shift_inside`): exactly the values of the materialised shift, states
    included; a packed step of several sequences keeps the materialised shift."""
    model = load_model(case)
    plain, plain_state, plain_calls = _steps_over_carried_states(model, shift_inside=False)
    inside, inside_state, inside_calls = _steps_over_carried_states(model, shift_inside=True)
    assert plain_calls == 0 and inside_calls == 2 * model.config.n_finch
    for a, b in zip(plain, inside):
        assert torch.equal(a, b)
    for a, b in zip(plain_state, inside_state):
        for name in ("wkv", "tmix_shift", "cmix_shift"):
            assert torch.equal(getattr(a.rnn, name), getattr(b.rnn, name)), name
