"""Logits match the GoldFinch reference code (../shared/conformance): one test per case folder."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import CONFORMANCE_DIR, conformance_cases, load_model

CASES = conformance_cases()
TOL_FP32 = 1e-4


def golden(case: str) -> dict[str, np.ndarray]:
    return dict(np.load(CONFORMANCE_DIR / case / "golden.npz"))


def test_conformance_cases_present():
    assert CASES, f"no conformance cases found under {CONFORMANCE_DIR}"


@pytest.mark.parametrize("case", CASES)
def test_logits_full(case):
    g = golden(case)
    model = load_model(case)
    logits, _ = model.forward(torch.from_numpy(g["tokens"]), all_logits=True)
    diff = (logits - torch.from_numpy(g["logits_full"])).abs().max().item()
    assert diff < TOL_FP32, f"{case}: max |logit diff| {diff:.3g}"


@pytest.mark.parametrize("case", CASES)
def test_logits_step(case):
    """A prefix pass, then one token at a time with the carried (compressed) state."""
    g = golden(case)
    model = load_model(case)
    tokens, P = torch.from_numpy(g["tokens"]), int(g["prefix_len"])
    logits, state = model.forward(tokens[:, :P])
    rows = [logits]
    for t in range(P, tokens.shape[1]):
        logits, state = model.forward(tokens[:, t:t + 1], state)
        rows.append(logits)
    diff = (torch.stack(rows, 1) - torch.from_numpy(g["logits_step"])).abs().max().item()
    assert diff < TOL_FP32, f"{case}: max |logit diff| {diff:.3g}"


@pytest.mark.parametrize("case", CASES)
def test_batch_of_uneven_sequences_matches_each_alone(case):
    """Sequences of different lengths in one packed step give what each gives alone (batch > 1)."""
    from engine.model import StepBatch

    g = golden(case)
    model = load_model(case)
    tokens = torch.from_numpy(g["tokens"]).reshape(-1)
    lengths = [5, 1, 17, 9]
    seqs = [tokens[i * 3: i * 3 + n] for i, n in enumerate(lengths)]
    state = model.new_state(len(seqs))
    state.keys.set_step_lens(lengths)
    batch = StepBatch(token_ids=torch.cat(seqs), query_lens=tuple(lengths), context_lens=(0,) * 4,
                      state_slots=torch.arange(4))
    together = model.step(batch, state.rnn, state.keys)
    for i, s in enumerate(seqs):
        alone, _ = model.forward(s[None])
        assert torch.allclose(together[i], alone[0], atol=1e-5), f"sequence {i} differs in the batch"
    full = torch.from_numpy(g["logits_full"])
    # the first sequence is the start of golden row 0: its last logits are the reference's too
    assert (together[0] - full[0, lengths[0] - 1]).abs().max() < TOL_FP32
