"""Greedy choices made inside the static decode step (`DecodeStep.with_greedy`, taken by
`StepSampling.launch`) against the sampler: the same tokens and log-probs for every request, and
the sampler still runs for every row the step's choice would get wrong."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import load_model
from engine.config_engine import EngineConfig
from engine.engine import LLMEngine
from engine.model_runner import StepOutput
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.step_sampling import StepSampling

CASE = "goldfinch_l6_d128"


def make_engine(greedy_in_step: bool, overlap: bool = True) -> tuple[LLMEngine, list[bool]]:
    """An engine and the list of `greedy_applies` answers it gave (always False when the step's
    choices are turned off: every row then goes through the sampler)."""
    engine = LLMEngine(load_model(CASE), None, EngineConfig(cache_tokens=4096, kv_working_set_page_size=8,
                                                            overlap_decode=overlap, check_integrity=True))
    answers: list[bool] = []

    def recorded(step, ready, pending):
        answers.append(greedy_in_step and StepSampling.greedy_applies(step, ready, pending))
        return answers[-1]

    engine.sampling.greedy_applies = recorded
    return engine, answers


def run(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]]) -> dict:
    for i, (ids, params) in enumerate(requests):
        engine.add_request(ids, params, request_id=f"q{i}")
    outputs = {}
    while engine.has_unfinished():
        for update in engine.step():
            if update.finished:
                outputs[update.request_id] = update.output.outputs[0]
    return outputs


def assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for rid, e in expected.items():
        g = got[rid]
        assert g.token_ids == e.token_ids and g.finish_reason == e.finish_reason, rid
        if e.logprobs is None:
            assert g.logprobs is None
            continue
        for lg, le in zip(g.logprobs, e.logprobs, strict=True):
            assert lg.token_id == le.token_id and abs(lg.logprob - le.logprob) < 1e-5 and lg.top == le.top


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_greedy_rows_take_the_steps_choice_with_the_samplers_tokens(overlap):
    rng = random.Random(5)
    requests = [([rng.randrange(512) for _ in range(n)], SamplingParams(temperature=0, max_tokens=m, ignore_eos=True,
                                                                        logprobs=lp))
                for n, m, lp in ((7, 12, 0), (30, 9, None), (19, 14, 0))]
    got_engine, got_answers = make_engine(True, overlap)
    want_engine, _ = make_engine(False, overlap)
    got, want = run(got_engine, requests), run(want_engine, requests)
    assert_same(got, want)
    assert got_answers.count(True) >= 8  # the decode steps took the step's choices
    assert got_engine.runner.num_fast_steps >= 8


def test_rows_the_choice_cannot_serve_go_through_the_sampler():
    """A step with any row that samples, biases, penalises, masks stop ids or wants top log-probs
    samples every row; the plain greedy rows beside it get the same tokens either way."""
    rng = random.Random(7)
    plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    others = [SamplingParams(temperature=0.8, seed=3, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias={5: 4.0}),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, presence_penalty=0.5),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, min_tokens=8, stop_token_ids=[3]),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)]
    for other in others:
        requests = [([rng.randrange(512) for _ in range(9)], plain), ([rng.randrange(512) for _ in range(11)], other)]
        got_engine, answers = make_engine(True)
        want_engine, _ = make_engine(False)
        assert_same(run(got_engine, requests), run(want_engine, requests))
        assert not any(answers), other


def _seq(params: SamplingParams, outputs: int = 0) -> Sequence:
    seq = Sequence(request_id="r", prompt_token_ids=[1, 2], params=params, seed=0)
    seq.output_token_ids.extend([4] * outputs)
    return seq


def test_greedy_applies_only_to_every_row_in_order():
    step = StepOutput(torch.zeros(3, 16), torch.zeros(3, dtype=torch.long), torch.zeros(3))
    g = SamplingParams(temperature=0, max_tokens=4)
    seqs = [_seq(g), _seq(g), _seq(g)]
    assert StepSampling.greedy_applies(step, list(enumerate(seqs)), 0)
    assert StepSampling.greedy_applies(step, list(enumerate(seqs[:2])), 0)  # rows past them are padding
    assert not StepSampling.greedy_applies(step, [(1, seqs[0]), (0, seqs[1])], 0)  # reordered
    assert not StepSampling.greedy_applies(step, [(0, seqs[0]), (0, seqs[1])], 0)  # forked samples of one row
    assert not StepSampling.greedy_applies(StepOutput(step.logits), list(enumerate(seqs)), 0)  # no choices made
    top_k_one = SamplingParams(temperature=0.7, top_k=1, max_tokens=4)
    assert StepSampling.greedy_applies(step, [(0, _seq(top_k_one))], 0)
    masked = SamplingParams(temperature=0, max_tokens=9, min_tokens=3, stop_token_ids=[2])
    assert not StepSampling.greedy_applies(step, [(0, _seq(masked, 1))], 1)  # step 2 < min_tokens
    assert StepSampling.greedy_applies(step, [(0, _seq(masked, 2))], 1)  # step 3: no mask any more


def test_choices_never_take_an_unsampleable_id():
    """Ids at or above the sampleable vocabulary (a model padded past its tokenizer) are never the
    step's choice, and the tokens equal the sampler's with those ids masked."""
    rng = random.Random(9)
    requests = [([rng.randrange(512) for _ in range(n)], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                                        logprobs=0)) for n in (6, 21)]
    outputs = []
    for greedy_in_step in (True, False):
        engine, answers = make_engine(greedy_in_step)
        engine.runner.decode_step.sampleable_vocab = 40  # read by every eager step (no graphs on the CPU)
        engine.sampling.sampleable_vocab = 40
        outputs.append(run(engine, requests))
        assert any(answers) == greedy_in_step
    assert_same(*outputs)
    assert all(t < 40 for o in outputs[0].values() for t in o.token_ids)
