"""The decode step's fused blocks (`engine.decode_fused`) against its unfused blocks: same logits,
states and caches step after step (on the CPU through the kernels' references; `test_gpu.py` runs
the engine with the Triton kernels against the plain path)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import engine.decode_fused as decode_fused
from conftest import load_model
from test_decode_step import decoding_engine


def _spy_gemv(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = decode_fused.decode_gemv

    def spy(x, weight, out, batch, plan=None, **kw):
        calls.append(kw.get("activation", "none"))
        return real(x, weight, out, batch, plan, **kw)

    monkeypatch.setattr(decode_fused, "decode_gemv", spy)
    return calls


@pytest.mark.parametrize("case", ["goldfinch_l6_d128", "goldfinch_rope_l6_d128"])
def test_fused_blocks_equal_unfused_blocks(case, monkeypatch):
    fused, plain = decoding_engine(case, True), decoding_engine(case, True)
    assert plain.runner.decode_step.fused is None  # on the CPU the unfused blocks by default
    fused.runner.decode_step.fused = decode_fused.FusedBlocks(fused.model)
    calls = _spy_gemv(monkeypatch)
    cfg = fused.model.config
    for _ in range(3):
        calls.clear()
        logits_fused = fused.runner.execute(fused.scheduler.schedule()).logits.float()
        logits_plain = plain.runner.execute(plain.scheduler.schedule()).logits.float()
        # per Finch block: stacked front, output, channel mix, value; per GOLD block: query, output,
        # channel mix, value (the LoRAs' first stages are in the norms or the stacked front); the head
        assert len(calls) == 4 * cfg.n_layer + 1
        assert calls.count("gated_residual") == cfg.n_layer and calls.count("relu_square") == cfg.n_layer
        assert (logits_fused - logits_plain).abs().max() < 1e-4
        for row, (seq_f, seq_p) in enumerate(zip(fused.scheduler.running, plain.scheduler.running)):
            token = int(logits_plain[row].argmax())
            seq_f.output_token_ids.append(token)
            seq_p.output_token_ids.append(token)
    for name in ("wkv", "tmix_shift", "cmix_shift"):
        a, b = getattr(fused.cache.rnn, name), getattr(plain.cache.rnn, name)
        assert (a - b).abs().max() < 1e-4, name


def test_finch_without_c2_and_large_batches_keep_the_unfused_blocks():
    from engine.decode_step import DecodeStep

    engine = decoding_engine("goldfinch_upgrade_l6_d256", True)  # an x060 (Finch) time mix
    step = DecodeStep(engine.model, engine.cache.rnn, engine.cache.keys, engine.runner.working_sets.pool, fused=True)
    assert step.fused is None
    assert decode_fused.FusedBlocks.applies(decode_fused.SMALL_BATCH)
    c2 = load_model("goldfinch_l6_d128").config
    assert decode_fused.supported(c2)
    assert not decode_fused.supported(dataclasses.replace(c2, dim_ffn=c2.dim_ffn + 8))  # not on 16-column blocks
    assert not decode_fused.FusedBlocks.applies(decode_fused.SMALL_BATCH + 1)


def test_stacked_front_rows_are_the_transposed_loras():
    model = load_model("goldfinch_l6_d128")
    w, cfg = model.blocks[0], model.config
    stacked = w[decode_fused.L.TMIX_STACKED]
    A, r = cfg.dim_att, w["att.time_decay_w1"].shape[1]
    assert torch.equal(stacked[3 * A:3 * A + r], w["att.time_decay_w1"].T)
    assert torch.equal(stacked[3 * A + r:], w["att.time_value2_w1"].T)
