"""Greedy sampling in the decode step (`kernels.greedy_sample`) against its reference, and the
reference against the engine's sampler on greedy rows.

Without CUDA the kernel runs under Triton's interpreter at small vocabularies split into many
chunks (float32 and float16; the interpreter gets bfloat16 wrong); with CUDA also bf16 at the 1.5B
shape's vocabulary and the default chunk.
"""
from __future__ import annotations

import pytest
import torch

from triton_interpreter import (CUDA, import_kernels, interpreter_while_testing,  # noqa: F401 (fixture, test)
                                needs_subprocess, test_module_under_interpreter_in_subprocess)

DEVICE = "cuda" if CUDA else "cpu"
IN_SUBPROCESS = needs_subprocess()
(_mod,) = import_kernels(("kernels.greedy_sample",), "greedy_sample_fwd_kernel", IN_SUBPROCESS)
greedy_sample = _mod.greedy_sample

from engine.sampler import Sampler, make_sampling_batch  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from kernels.dispatch import greedy_counters  # noqa: E402
from kernels.greedy_sample_reference import greedy_sample_reference  # noqa: E402


def _logits(B, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, V, generator=g) * 3).to(dtype).to(DEVICE)


def _check(logits, n_valid, chunk, counters):
    ids, lps = greedy_sample(logits, n_valid, counters, chunk=chunk)
    ref_ids, ref_lps = greedy_sample_reference(logits, n_valid)
    assert ids.dtype == torch.int64 and lps.dtype == torch.float32
    assert torch.equal(ids.cpu(), ref_ids.cpu())
    assert torch.allclose(lps.cpu(), ref_lps.cpu(), rtol=1e-5, atol=1e-5)
    assert not counters.any()  # left zero for the next call


@pytest.mark.parametrize("B,V,n_valid,chunk", [(1, 100, 100, 16), (3, 300, 257, 32), (2, 64, 64, 64),
                                               (5, 1000, 999, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_matches_the_reference(dtype, B, V, n_valid, chunk):
    counters = greedy_counters(DEVICE, 8)
    logits = _logits(B, V, dtype, seed=V)
    _check(logits, n_valid, chunk, counters)
    _check(logits * -1, n_valid, chunk, counters)  # a second call on the same counters


def test_first_of_equal_maxima_and_ids_past_n_valid():
    """Ties go to the lowest id, also when they lie in different chunks; ids >= n_valid are never
    chosen even when they hold the largest logit; a row of strided rows is read in place."""
    counters = greedy_counters(DEVICE, 4)
    base = torch.zeros(3, 2 * 96)
    logits = base[:, ::1][:, :96]  # rows strided by 192
    logits[0, [70, 20, 50]] = 5.0  # three chunks of 16 hold the maximum: the first is 20
    logits[1, 95] = 9.0  # past n_valid = 90
    logits[1, 89] = 1.0
    logits[2, :] = -1.0  # all equal: id 0
    logits = logits.to(DEVICE)
    ids, lps = greedy_sample(logits, 90, counters, chunk=16)
    assert ids.tolist() == [20, 89, 0]
    ref_ids, ref_lps = greedy_sample_reference(logits, 90)
    assert ids.cpu().tolist() == ref_ids.tolist() and torch.allclose(lps.cpu(), ref_lps.cpu(), atol=1e-6)
    assert abs(lps[2].item() + torch.log(torch.tensor(90.0)).item()) < 1e-5


def test_reference_is_the_samplers_greedy_rows():
    """The reference gives the tokens and raw log-probs that `Sampler` gives greedy rows (sampleable
    ids limited as `StepSampling` limits them: -inf past them)."""
    B, V, n_valid = 4, 500, 480
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(3)) * 4
    params = [SamplingParams(temperature=0.0, max_tokens=8, logprobs=0)] * B
    batch = make_sampling_batch(params, [[]] * B, [[1]] * B, [0] * B, V, "cpu", seeds=[0] * B)
    masked = logits.clone()
    masked[:, n_valid:] = float("-inf")
    out = Sampler()(masked, batch)
    ids, lps = greedy_sample_reference(logits, n_valid)
    assert torch.equal(ids, out.token_ids) and torch.allclose(lps, out.logprobs, atol=1e-6)


def test_bad_inputs_name_the_field():
    counters = greedy_counters(DEVICE, 2)
    logits = _logits(2, 64, torch.float32)
    with pytest.raises(ValueError, match="n_valid"):
        greedy_sample(logits, 65, counters, chunk=16)
    with pytest.raises(ValueError, match="counters"):
        greedy_sample(logits, 64, greedy_counters(DEVICE, 1), chunk=16)
    with pytest.raises(ValueError, match="logits"):
        greedy_sample(logits.long(), 64, counters, chunk=16)
    with pytest.raises(ValueError, match="chunk"):
        greedy_sample(logits, 64, counters, chunk=24)
    with pytest.raises(ValueError, match="token_ids"):
        greedy_sample(logits, 64, counters, token_ids=torch.empty(2, dtype=torch.int32, device=DEVICE), chunk=16)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("B", [1, 4, 64])
def test_vocabulary_of_the_paper_shape_bf16(B):
    counters = greedy_counters(DEVICE, 64)
    logits = _logits(B, 65536, torch.bfloat16, seed=B)
    for n_valid in (65536, 65529):
        ids, lps = greedy_sample(logits, n_valid, counters)
        ref_ids, ref_lps = greedy_sample_reference(logits, n_valid)
        assert torch.equal(ids, ref_ids) and torch.allclose(lps, ref_lps, rtol=1e-5, atol=1e-5)
    assert not counters.any()
