"""Seeded sampling in one launch (`kernels.token_sample`, with `kernels.top_p_threshold`) against its
reference, and the reference against the engine's sampler.

Without CUDA the kernels run under Triton's interpreter at small vocabularies split into many chunks
(float32 and float16; the interpreter gets bfloat16 wrong; top-p needs 16-bit logits); with CUDA
also bf16 at the 1.5B shape's vocabulary through `Sampler`, fused against its torch path.
"""
from __future__ import annotations

import pytest
import torch

from triton_interpreter import (CUDA, import_kernels, interpreter_while_testing,  # noqa: F401 (fixture, test)
                                needs_subprocess, test_module_under_interpreter_in_subprocess)

DEVICE = "cuda" if CUDA else "cpu"
IN_SUBPROCESS = needs_subprocess()
_threshold, _sample = import_kernels(("kernels.top_p_threshold", "kernels.token_sample"), "top_p_high_fwd_kernel",
                                     IN_SUBPROCESS)
token_sample, top_p_min_keys = _sample.token_sample, _threshold.top_p_min_keys

from engine.sampler import Sampler, make_sampling_batch  # noqa: E402
from engine.sampling_noise import exponential_noise  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from kernels.dispatch import greedy_counters  # noqa: E402
from kernels.token_sample_reference import (ordered_keys16, token_sample_reference, top_p_keep,  # noqa: E402
                                            top_p_min_keys_reference)


def _rows(B, V, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, V, generator=g) * 3).to(dtype)
    temperature = torch.tensor([0.7, 1.0, 1.6, 0.3, 1.0, 0.9][:B])
    greedy = torch.tensor([False, False, True, False, False, True][:B])
    seeds = torch.tensor([1, -5, 7, 2**62 + 9, 123456789012, 0][:B], dtype=torch.int64)
    steps = torch.tensor([0, 3, 1, 2**33 + 1, 17, 2][:B], dtype=torch.int64)
    return [t.to(DEVICE) for t in (logits, temperature, greedy, seeds, steps)]


def _check(logits, n_valid, temperature, greedy, seeds, steps, counters, chunk, top_p=None):
    ids, lps = token_sample(logits, n_valid, temperature, greedy, seeds, steps, counters, top_p=top_p, chunk=chunk)
    ref_ids, ref_lps = token_sample_reference(logits, n_valid, temperature, greedy, seeds, steps, top_p)
    assert ids.dtype == torch.int64 and lps.dtype == torch.float32
    assert ids.cpu().tolist() == ref_ids.cpu().tolist()
    assert torch.allclose(lps.cpu(), ref_lps.cpu(), rtol=1e-5, atol=1e-5)
    assert not counters.any()  # left zero for the next call
    return ids


@pytest.mark.parametrize("B,V,n_valid,chunk", [(4, 96, 96, 32), (5, 200, 181, 64), (1, 64, 64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_draws_match_the_reference(dtype, B, V, n_valid, chunk):
    """Greedy and sampled rows side by side, several steps of the same rows (a new draw each)."""
    logits, temperature, greedy, seeds, steps = _rows(B, V, dtype, seed=V)
    counters = greedy_counters(DEVICE, 8)
    for i in range(3):
        _check(logits, n_valid, temperature, greedy, seeds, steps + i, counters, chunk)


def test_noise_is_the_samplers_hash():
    """Equal logits: the draw is the id of the smallest noise, so every id's noise is checked
    against `engine.sampling_noise` (a wrong hash bit or row key picks another id)."""
    B, V = 3, 128
    logits = torch.zeros(B, V, device=DEVICE)
    seeds = torch.tensor([0, -1, 2**63 - 1], dtype=torch.int64, device=DEVICE)
    counters = greedy_counters(DEVICE, B)
    drawn = []
    for step in (0, 1, 2**32 + 5):
        steps = torch.full((B,), step, dtype=torch.int64, device=DEVICE)
        ids, lps = token_sample(logits, V, torch.ones(B, device=DEVICE), torch.zeros(B, dtype=torch.bool, device=DEVICE),
                                seeds, steps, counters, chunk=32)
        expected = exponential_noise(seeds.cpu(), steps.cpu(), V).argmin(dim=-1)
        assert ids.cpu().tolist() == expected.tolist()
        drawn.append(tuple(ids.tolist()))
        assert torch.allclose(lps.cpu(), torch.full((B,), -torch.log(torch.tensor(float(V)))), atol=1e-5)
    assert len(set(drawn)) == 3  # the step keys the draw


@pytest.mark.parametrize("top", [(0.9, 0.5, 1.0, 0.95, 0.2), (0.05, 0.999, 0.6, 0.3, 0.8)])
def test_top_p_matches_the_reference(top):
    """float16 rows with greedy ones and top_p 1 among them: the kept set (ids at or above the
    kernel's key) is the reference's, and so are the draws."""
    B, V, n_valid, chunk = 5, 160, 150, 32
    logits, temperature, greedy, seeds, steps = _rows(B, V, torch.float16, seed=11)
    top_p = torch.tensor(top, device=DEVICE)
    keys = top_p_min_keys(logits, n_valid, temperature, top_p, greedy, torch.zeros(B, dtype=torch.int32, device=DEVICE),
                          chunk).cpu()
    ref_keys = top_p_min_keys_reference(logits.cpu(), n_valid, temperature.cpu(), top_p.cpu())
    keep = top_p_keep(logits[:, :n_valid].cpu().float() / temperature.cpu()[:, None], top_p.cpu())
    for r in range(B):
        if greedy[r] or top_p[r] >= 1:
            assert keys[r] == 0  # skipped: left as it was
            continue
        assert keys[r] <= ref_keys[r]
        row_keys = ordered_keys16(logits[r, :n_valid].cpu())
        assert torch.equal(row_keys >= keys[r], keep[r]), r
        assert 1 <= int(keep[r].sum()) < n_valid
    counters = greedy_counters(DEVICE, 8)
    for i in range(3):
        _check(logits, n_valid, temperature, greedy, seeds, steps + i, counters, chunk, top_p)


def test_top_p_keeps_every_id_tied_at_the_cut():
    """Ids of equal logits at the cut are all kept (wherever their chunks), and -0 and +0 count as
    equal; the set is the smallest whose mass strictly above its last value is < top_p."""
    V = 128
    x = torch.full((1, V), -30.0)
    x[0, 5] = 4.0
    x[0, [9, 40, 77, 120]] = 2.0  # tied; p(4.0) = 0.65 of the mass, each 2.0 ~0.088
    x[0, [3, 100]] = 0.0
    x[0, 101] = -0.0
    logits = x.half().to(DEVICE)
    one, no = torch.ones(1, device=DEVICE), torch.zeros(1, dtype=torch.bool, device=DEVICE)
    for p, kept in ((0.6, {5}), (0.7, {5, 9, 40, 77, 120}), (0.999, {5, 9, 40, 77, 120, 3, 100, 101})):
        key = top_p_min_keys(logits, V, one, torch.tensor([p], device=DEVICE), no,
                             torch.zeros(1, dtype=torch.int32, device=DEVICE), 32).cpu()
        assert set(torch.nonzero(ordered_keys16(logits[0].cpu()) >= key[0]).flatten().tolist()) == kept, p
        ref = top_p_keep(logits.cpu().float(), torch.tensor([p]))
        assert set(torch.nonzero(ref[0]).flatten().tolist()) == kept, p


def test_reference_is_the_samplers():
    """The reference gives the tokens and raw log-probs that `Sampler`'s torch path gives rows of
    temperature and top-p (greedy rows among them, sampleable ids limited by n_valid)."""
    B, V, n_valid = 4, 500, 480
    logits = (torch.randn(B, V, generator=torch.Generator().manual_seed(3)) * 4).half()
    params = [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8), SamplingParams(temperature=0.0, max_tokens=8),
              SamplingParams(temperature=1.3, max_tokens=8), SamplingParams(temperature=1.0, top_p=0.5, max_tokens=8)]
    for step in range(4):
        batch = make_sampling_batch(params, [[]] * B, [[1]] * B, [step] * B, V, "cpu", seeds=[4, 5, 6, 7])
        out = Sampler()(logits, batch, n_valid=n_valid)
        ids, lps = token_sample_reference(logits, n_valid, batch.temperature, batch.greedy, batch.seeds, batch.steps,
                                          batch.top_p)
        assert torch.equal(ids, out.token_ids) and torch.allclose(lps, out.logprobs, atol=1e-6)
        assert int(ids.max()) < n_valid


def test_bad_inputs_name_the_field():
    logits, temperature, greedy, seeds, steps = _rows(2, 64, torch.float32, seed=1)
    counters = greedy_counters(DEVICE, 2)
    args = [logits, 64, temperature, greedy, seeds, steps, counters]
    for i, name, bad in ((1, "n_valid", 65), (2, "temperature", temperature.double()), (3, "greedy", greedy.int()),
                         (4, "seeds", seeds[:1]), (5, "steps", steps.int()), (6, "counters", counters[:1]),
                         (0, "logits", logits.long())):
        with pytest.raises(ValueError, match=name):
            token_sample(*args[:i], bad, *args[i + 1:], chunk=16)
    with pytest.raises(ValueError, match="chunk"):
        token_sample(*args, chunk=24)
    with pytest.raises(ValueError, match="top_p"):  # needs 16-bit keys
        token_sample(*args, top_p=torch.full((2,), 0.5, device=DEVICE), chunk=16)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("B", [1, 4, 64])
def test_sampler_fused_against_its_torch_path_bf16(B):
    """At the 1.5B shape's vocabulary in bf16: `Sampler` drawing through the kernels gives the
    tokens of its torch path over many steps (temperature, top-p, greedy rows mixed)."""
    V, n_valid = 65536, 65529
    g = torch.Generator().manual_seed(B)
    choices = [SamplingParams(temperature=0.8, top_p=0.95), SamplingParams(temperature=1.0),
               SamplingParams(temperature=0.0), SamplingParams(temperature=0.6, top_p=0.5)]
    params = [choices[i % 4] for i in range(B)]
    sampler, torch_path = Sampler(), Sampler()
    torch_path.fused_applies = lambda logits, batch: False
    differ = 0
    for step in range(8):
        logits = (torch.randn(B, V, generator=g) * 3).to(torch.bfloat16).cuda()
        batch = make_sampling_batch(params, [[]] * B, [[1]] * B, [step] * B, V, "cuda", seeds=list(range(B)))
        assert sampler.fused_applies(logits, batch)
        fused, plain = sampler(logits, batch, n_valid=n_valid), torch_path(logits, batch, n_valid=n_valid)
        differ += int((fused.token_ids != plain.token_ids).sum())
        assert torch.allclose(fused.logprobs, plain.logprobs, rtol=1e-5, atol=1e-4)
        assert int(fused.token_ids.max()) < n_valid
    assert differ == 0
