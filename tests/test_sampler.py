"""Tests for SamplingParams validation and the batched Sampler (CPU, exact or statistically safe)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from engine.sampler import Sampler, SamplingBatch, _apply_top_k_top_p, apply_penalties_and_bias, make_sampling_batch
from engine.sampling_noise import counter_hash_bits, exponential_noise
from engine.sampling_params import SamplingParams, resolve_seed

PROBS = [0.5, 0.3, 0.15, 0.05]
M32 = 0xFFFFFFFF


def batch_for(params: list[SamplingParams], vocab: int, *, seeds: list[int] | None = None,
              outputs: list[list[int]] | None = None, prompts: list[list[int]] | None = None,
              steps: list[int] | None = None, eos: int | None = None) -> SamplingBatch:
    n = len(params)
    return make_sampling_batch(
        params, outputs or [[] for _ in range(n)], prompts or [[] for _ in range(n)],
        steps or [0] * n, vocab, "cpu", seeds=seeds or list(range(n)), eos_token_id=eos)


def sample_many(params: SamplingParams, probs: list[float], n: int = 4000) -> Counter[int]:
    """Draw n tokens from one distribution, one row per seed (vectorised as one batch)."""
    logits = torch.tensor(probs).log().expand(n, -1).contiguous()
    batch = batch_for([params] * n, len(probs), seeds=[1000 + i for i in range(n)])
    return Counter(Sampler()(logits, batch).token_ids.tolist())


def assert_frequencies(counts: Counter[int], expected: dict[int, float]) -> None:
    """Exact support; frequencies within 6 standard errors (+ a small floor)."""
    total = sum(counts.values())
    assert set(counts) == set(expected)
    for token, p in expected.items():
        tolerance = 6 * math.sqrt(p * (1 - p) / total) + 1e-3
        assert abs(counts[token] / total - p) < tolerance, (token, counts[token] / total, p)


def normalised(weights: dict[int, float]) -> dict[int, float]:
    z = sum(weights.values())
    return {k: v / z for k, v in weights.items()}


# --------------------------------------------------------------------------- SamplingParams

@pytest.mark.parametrize("field, value", [
    ("n", 0), ("temperature", -0.1), ("temperature", 2.5), ("temperature", float("nan")),
    ("top_p", 0.0), ("top_p", 1.1), ("top_k", -2), ("min_p", 1.5),
    ("presence_penalty", 2.1), ("frequency_penalty", -3.0), ("frequency_penalty", float("inf")),
    ("repetition_penalty", 0.0), ("max_tokens", 0), ("logprobs", 21), ("logprobs", -1),
    ("logit_bias", {5: 101.0}), ("logit_bias", {5: float("nan")}), ("logit_bias", {-1: 1.0}),
    ("stop", [""]), ("stop_token_ids", (-1,)), ("n", True), ("seed", 1.5), ("ignore_eos", 1),
])
def test_validation_error_names_field(field: str, value: object) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    assert str(info.value).startswith(f"{field}:")


def test_min_tokens_must_not_exceed_max_tokens() -> None:
    with pytest.raises(ValueError, match=r"^min_tokens:"):
        SamplingParams(max_tokens=4, min_tokens=5)
    SamplingParams(max_tokens=4, min_tokens=4)


def test_validate_for_vocab() -> None:
    SamplingParams(logit_bias={99: 1.0}, stop_token_ids=(99,)).validate_for_vocab(100)
    with pytest.raises(ValueError, match=r"^logit_bias:"):
        SamplingParams(logit_bias={100: 1.0}).validate_for_vocab(100)
    with pytest.raises(ValueError, match=r"^stop_token_ids:"):
        SamplingParams(stop_token_ids=(100,)).validate_for_vocab(100)


def test_params_normalised_and_hashable() -> None:
    p = SamplingParams(logit_bias={"7": 1, 3: -2.5}, stop="END", stop_token_ids=[4], temperature=1)
    assert p.logit_bias == ((3, -2.5), (7, 1.0))
    assert p.stop == ("END",) and p.stop_token_ids == (4,)
    assert isinstance(p.temperature, float)
    assert hash(p) == hash(SamplingParams(logit_bias={7: 1.0, 3: -2.5}, stop=("END",),
                                          stop_token_ids=(4,)))
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    assert not SamplingParams().greedy


def test_resolve_seed() -> None:
    assert resolve_seed(SamplingParams(seed=42)) == 42
    derived = {resolve_seed(SamplingParams(seed=42), i) for i in range(1, 6)}
    assert len(derived) == 5 and 42 not in derived
    assert derived == {resolve_seed(SamplingParams(seed=42), i) for i in range(1, 6)}
    fresh = [resolve_seed(SamplingParams()) for _ in range(8)]
    assert all(0 <= s < 2**63 for s in fresh + list(derived)) and len(set(fresh)) == 8


# --------------------------------------------------------------------------- hash

def _py_fmix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def _py_hash(seed: int, step: int, v: int) -> int:
    seed &= (1 << 64) - 1
    lo, hi, t = seed & M32, seed >> 32, step & M32
    k1 = _py_fmix32(_py_fmix32(_py_fmix32(lo ^ 0x9E3779B9) ^ hi) ^ t)
    k2 = _py_fmix32(_py_fmix32(_py_fmix32(hi ^ 0x7F4A7C15) ^ lo) ^ t)
    return _py_fmix32(_py_fmix32((v + k1) & M32) ^ k2)


def test_counter_hash_matches_exact_integer_reference() -> None:
    seeds = [0, 1, 2**31 - 1, 2**32, 2**63 - 1, -1, -(2**63), 123456789123456789]
    steps = [0, 1, 7, 2**31, 5, 100, 3, 2**32 - 1]
    signed = [s - (1 << 64) if s >= (1 << 63) else s for s in ((x & ((1 << 64) - 1)) for x in seeds)]
    bits = counter_hash_bits(torch.tensor(signed), torch.tensor(steps), 300)
    expected = [[_py_hash(s, t, v) for v in range(300)] for s, t in zip(seeds, steps)]
    assert bits.tolist() == expected
    assert all(len(set(row)) == 300 for row in expected)  # bijective in v


def test_exponential_noise_is_positive_finite_and_unit_mean() -> None:
    noise = exponential_noise(torch.arange(64), torch.zeros(64, dtype=torch.int64), 4096)
    assert torch.isfinite(noise).all() and (noise > 0).all()
    assert abs(noise.double().mean().item() - 1.0) < 0.01  # 262144 draws: s.e. 0.002


# --------------------------------------------------------------------------- sampling

def test_greedy_picks_argmax() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=1, temperature=1.5)] * 3
    out = Sampler()(logits, batch_for(params, 50))
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()


def test_temperature_one_matches_distribution() -> None:
    assert_frequencies(sample_many(SamplingParams(), PROBS), dict(enumerate(PROBS)))


def test_temperature_sharpens_distribution() -> None:
    expected = normalised({i: p ** 2 for i, p in enumerate(PROBS)})  # T = 0.5 squares p
    assert_frequencies(sample_many(SamplingParams(temperature=0.5), PROBS), expected)


@pytest.mark.parametrize("params, support", [
    (SamplingParams(top_k=2), [0, 1]),
    (SamplingParams(top_k=-1), [0, 1, 2, 3]),
    (SamplingParams(top_k=99), [0, 1, 2, 3]),
    (SamplingParams(top_p=0.4), [0]),
    (SamplingParams(top_p=0.7), [0, 1]),
    (SamplingParams(top_p=0.9), [0, 1, 2]),
    (SamplingParams(min_p=0.2), [0, 1, 2]),  # threshold 0.1
    (SamplingParams(min_p=0.5), [0, 1]),  # threshold 0.25
    # top_p acts on the top-k renormalised distribution: 0.5/0.95 + 0.3/0.95 > 0.83
    (SamplingParams(top_k=3, top_p=0.83), [0, 1]),
    # temperature is applied before top_p: at T=0.5, p0 = 0.685 > 0.6
    (SamplingParams(temperature=0.5, top_p=0.6), [0]),
])
def test_truncation_support_and_frequencies(params: SamplingParams, support: list[int]) -> None:
    weights = {i: PROBS[i] ** (1 / params.temperature) for i in support}
    assert_frequencies(sample_many(params, PROBS), normalised(weights))


def test_top_p_keeps_every_token_tied_at_the_cut() -> None:
    """Probabilities 0.4 and four tied at 0.15: top_p 0.5 needs one of the tied tokens, and all four
    are kept (whichever the sort put first); top_p 0.4 keeps token 0 alone."""
    probs = [0.4, 0.15, 0.15, 0.15, 0.15]
    logits = torch.tensor([probs]).log()
    for top_p, support in ((0.5, {0, 1, 2, 3, 4}), (0.4, {0}), (0.95, {0, 1, 2, 3, 4})):
        batch = batch_for([SamplingParams(top_p=top_p)], 5)
        kept = torch.isfinite(_apply_top_k_top_p(logits, batch))[0]
        assert set(torch.nonzero(kept).flatten().tolist()) == support, top_p
    counts = sample_many(SamplingParams(top_p=0.5), probs, n=2000)
    assert set(counts) == {0, 1, 2, 3, 4}


def test_top_p_one_keeps_tiny_tail_tokens() -> None:
    probs = [0.9] + [0.1 / 200] * 200
    counts = sample_many(SamplingParams(top_p=1.0, temperature=2.0), probs, n=2000)
    assert max(counts) > 150  # tail tokens are drawn


def test_penalties_and_bias_exact() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0], [2.0, -1.0, 0.5, 3.0, -2.0]])
    penalised = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5,
                               frequency_penalty=0.25, logit_bias={4: 1.5, 0: 2.0})
    batch = batch_for([penalised, SamplingParams()], 5, outputs=[[1, 3, 3], [1, 3, 3]],
                      prompts=[[0], [0]])
    out = apply_penalties_and_bias(logits, batch)
    # token 0: (2 + 2 bias) / 2 (prompt, positive) = 2
    # token 1: -1 * 2 (output, negative) - 0.25 * 1 - 0.5 = -2.75
    # token 2: untouched; token 3: 3 / 2 - 0.25 * 2 - 0.5 = 0.5; token 4: -2 + 1.5 = -0.5
    assert out[0].tolist() == [2.0, -2.75, 0.5, 0.5, -0.5]
    assert out[1].tolist() == logits[1].tolist()  # default row untouched
    assert logits[0].tolist() == [2.0, -1.0, 0.5, 3.0, -2.0]  # input not mutated


def test_logit_bias_forces_and_bans() -> None:
    logits = torch.zeros(2, 10)
    params = [SamplingParams(logit_bias={7: 100.0}), SamplingParams(temperature=0, logit_bias={0: -100.0})]
    assert Sampler()(logits, batch_for(params, 10)).token_ids.tolist() == [7, 1]


def test_min_tokens_masks_eos_and_stop_token_ids() -> None:
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0]]).expand(3, -1).contiguous()
    params = [SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(3,)),
              SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(3,)),
              SamplingParams(temperature=0, min_tokens=2, ignore_eos=True)]
    early = Sampler()(logits, batch_for(params, 4, steps=[1, 2, 0], eos=2)).token_ids
    # row 0 (step 1 < 2): EOS 2 and stop id 3 masked -> 1; row 1 reached min_tokens -> EOS;
    # row 2 ignores EOS, so EOS is an ordinary token and stays unmasked.
    assert early.tolist() == [1, 2, 2]


def test_logprobs_are_raw_and_top_logprobs_sorted() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 40, generator=gen) * 3
    params = [SamplingParams(temperature=0.7, top_k=5, presence_penalty=1.0, logprobs=3),
              SamplingParams(temperature=0, logit_bias={2: 50.0}),
              SamplingParams(logprobs=5, repetition_penalty=1.3)]
    out = Sampler()(logits, batch_for(params, 40, outputs=[[1], [2], [3]], prompts=[[4], [5], [6]]))
    raw = torch.log_softmax(logits, dim=-1)
    assert torch.equal(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.token_ids[1].item() == 2
    assert out.top_logprobs is not None and out.top_logprob_ids is not None
    assert out.top_logprobs.shape == (3, 5)
    expected_values, expected_ids = raw.sort(dim=-1, descending=True)
    assert torch.equal(out.top_logprobs, expected_values[:, :5])
    assert torch.equal(out.top_logprob_ids, expected_ids[:, :5])


def test_no_top_logprobs_when_not_requested() -> None:
    out = Sampler()(torch.zeros(2, 8), batch_for([SamplingParams(logprobs=0), SamplingParams()], 8))
    assert out.top_logprobs is None and out.top_logprob_ids is None
    assert torch.allclose(out.logprobs, torch.full((2,), -math.log(8)))


def test_reduced_precision_logits_accepted() -> None:
    logits = torch.randn(2, 16).to(torch.bfloat16)
    out = Sampler()(logits, batch_for([SamplingParams(), SamplingParams(temperature=0)], 16))
    assert out.token_ids[1].item() == logits[1].float().argmax().item()


def _generate(params: list[SamplingParams], seeds: list[int], row_logits: dict[int, torch.Tensor],
              vocab: int, steps: int = 20) -> list[list[int]]:
    """Decode `steps` tokens; rows not in row_logits get fixed arbitrary logits."""
    outputs: list[list[int]] = [[] for _ in params]
    filler = torch.randn(steps, len(params), vocab, generator=torch.Generator().manual_seed(9))
    for step in range(steps):
        logits = filler[step].clone()
        for row, per_step in row_logits.items():
            logits[row] = per_step[step]
        batch = make_sampling_batch(params, outputs, [[1, 2, 3]] * len(params), [step] * len(params),
                                    vocab, "cpu", seeds=seeds, eos_token_id=0)
        for row, token in enumerate(Sampler()(logits, batch).token_ids.tolist()):
            outputs[row].append(token)
    return outputs


def test_seeded_reproducibility_and_seed_sensitivity() -> None:
    vocab = 1000
    logits = torch.randn(20, vocab, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=1.0)]
    first = _generate(params, [77], {0: logits}, vocab)[0]
    assert first == _generate(params, [77], {0: logits}, vocab)[0]
    assert first != _generate(params, [78], {0: logits}, vocab)[0]


def test_batch_independence() -> None:
    vocab = 200
    logits = torch.randn(20, vocab, generator=torch.Generator().manual_seed(4))
    target = SamplingParams(temperature=0.9, top_p=0.95, min_p=0.01, frequency_penalty=0.3)
    alone = _generate([target], [2024], {0: logits}, vocab)[0]
    others = [SamplingParams(temperature=0), SamplingParams(top_k=5, repetition_penalty=1.2),
              SamplingParams(temperature=1.7, presence_penalty=-1.0), SamplingParams(min_p=0.3)]
    params = others[:3] + [target] + others[3:]
    batched = _generate(params, [1, 2, 3, 2024, 5], {3: logits}, vocab)[3]
    assert alone == batched
    assert len(set(alone)) > 5  # actually random, not collapsed to argmax


def test_shape_mismatch_rejected() -> None:
    with pytest.raises(ValueError, match=r"^logits:"):
        Sampler()(torch.zeros(2, 9), batch_for([SamplingParams()] * 2, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree() -> None:
    seeds, steps = torch.tensor([0, -1, 2**62, 12345]), torch.tensor([0, 3, 99, 2**31])
    cpu = counter_hash_bits(seeds, steps, 5000)
    assert torch.equal(cpu, counter_hash_bits(seeds.cuda(), steps.cuda(), 5000).cpu())
    params = [SamplingParams(top_p=0.9), SamplingParams(top_k=20, temperature=0.8)] * 2
    logits = torch.randn(4, 5000, generator=torch.Generator().manual_seed(5))
    on_cpu = Sampler()(logits, batch_for(params, 5000)).token_ids
    cuda_batch = make_sampling_batch(params, [[]] * 4, [[]] * 4, [0] * 4, 5000, "cuda", seeds=[0, 1, 2, 3])
    assert on_cpu.tolist() == Sampler()(logits.cuda(), cuda_batch).token_ids.cpu().tolist()
    fused = Sampler(compile_noise=True)(logits.cuda(), cuda_batch).token_ids.cpu()
    assert on_cpu.tolist() == fused.tolist()
