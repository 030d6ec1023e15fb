"""The benchmark's markdown report, rendered from a saved GPU run (the rendering runs anywhere)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_markdown_report_of_a_saved_run():
    from bench_model import render_markdown

    run = json.loads((ROOT / "benchmarks/results/bench_model_h100_s2_run2.json").read_text())
    md = render_markdown(run)
    assert md.startswith("# bench_model: NVIDIA H100 80GB HBM3")
    assert "| 1 x 4096 | derive | 37.2 |" in md  # a measured row, as measured
    assert "| 16 x 131072 | sets | RuntimeError" in md  # a failed case says so
    assert "Llama HF eager decode, batch 1 at 4096: 13.7 tok/s" in md
    assert "4,652 (state on the GPU)" in md
    run["prefill"] = [{"T": 4096, "tok_per_s": 64906.7, "peak_GiB": 3.1}]
    assert "| 4096 | 64.9K | 114.6K | 0.57x | 3.1 |" in render_markdown(run)


def test_engine_prefill_benchmark_runs_a_request_through_the_engine():
    """`bench_engine_prefill` on the CPU with a small model: a prompt of 100 tokens in chunks of at
    most 32, the last at least the GOLD tail (5 tokens here), ends in 4 engine steps."""
    sys.path.insert(0, str(ROOT / "tests"))
    from bench_engine_prefill import render_markdown, run
    from conftest import load_model

    model = load_model("goldfinch_l6_d128")
    assert model.config.gold_tail_len == 5
    result = run(model, [(32, 100)], "cpu", "test", modes=("eager",))
    (row,) = result["rows"]
    assert row["steps"] == 4 and row["tok_per_s"] > 0 and row["ttft_s"] > 0
    assert row["mode"] == "eager" and row["graph_replays"] == 0  # prefill graphs: GPU only
    assert "| 32 | 32 | 100 | 1 | eager | 0 |" in render_markdown(result)
    # nothing decodes: with a prefill-only budget of 64 the prompt is 64 + 36 tokens, 2 steps
    (row,) = run(model, [(32, 100)], "cpu", "test", modes=("eager",), prefill_only=(64,))["rows"]
    assert row["steps"] == 2 and row["prefill_only"] == 64
    # with two requests decoding meanwhile: each step feeds a chunk beside their decodes
    (row,) = run(model, [(32, 100)], "cpu", "test", modes=("eager",), decoding=2)["rows"]
    assert row["decoding"] == 2 and row["decode_tok_per_s"] > 0 and row["steps"] >= 4
    # three prompts at once: 300 tokens at 32 a step
    (row,) = run(model, [(32, 100)], "cpu", "test", modes=("eager",), together=3)["rows"]
    assert row["together"] == 3 and row["steps"] >= 10 and row["tok_per_s"] * row["ttft_s"] == pytest.approx(300)


def _fake_decode_child(case, deadline, steps, roofline, profile, conn):
    """A decode case's process, for `bench_decode_isolated`: batch 0 dies before sending."""
    import os

    batch, context, mode = case
    if batch == 0:
        os._exit(3)
    conn.send({"batch": batch, "context": context, "mode": mode, "pid": os.getpid(), "steps": steps})


def test_decode_cases_run_in_processes_of_their_own():
    """`bench_model.bench_decode_isolated`: each case in a fresh process (an engine's GPU memory is
    not all returned when it is deleted), its row returned in order; a case whose process dies is
    reported, not lost, and the cases after it still run."""
    import os
    import time

    from bench_model import bench_decode_isolated

    cases = [(1, 4096, "sets"), (0, 4096, "sets"), (8, 131072, "derive")]
    rows = bench_decode_isolated(cases, time.monotonic() + 120, steps=3, child=_fake_decode_child)
    assert [(r["batch"], r["context"], r["mode"]) for r in rows] == cases
    assert rows[1]["skipped"] == "the case's process died"
    assert rows[0]["pid"] != rows[2]["pid"] and os.getpid() not in (rows[0]["pid"], rows[2]["pid"])
    assert rows[0]["steps"] == rows[2]["steps"] == 3
    late = bench_decode_isolated(cases[:1], time.monotonic() - 1, child=_fake_decode_child)
    assert late == [{"batch": 1, "context": 4096, "mode": "sets", "skipped": "time budget"}]


def test_startup_benchmark_uses_the_servers_defaults():
    """`bench_startup` starts its engine as `goldfinch-serve` does with no options."""
    from bench_startup import SERVER_DEFAULTS
    from server.cli import parse_args

    args = parse_args([])
    assert {k: getattr(args, k) for k in SERVER_DEFAULTS} == SERVER_DEFAULTS


def test_startup_benchmark_times_an_engine_and_its_first_requests():
    """`bench_startup.measure` on the CPU with a small model: the engine's start and each request's
    first and last token, every requested token produced (sampled requests)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from bench_startup import measure
    from conftest import load_model
    from engine.config_engine import EngineConfig

    model = load_model("goldfinch_l6_d128")
    run = measure(model, EngineConfig(max_model_len=128, max_num_batched_tokens=32), [40, 90], max_tokens=3,
                  temperature=0.8)
    assert run["engine_start_s"] > 0
    assert [r["prompt"] for r in run["requests"]] == [40, 90]
    for r in run["requests"]:
        assert r["tokens"] == 3 and 0 < r["ttft_s"] <= r["total_s"]


def test_ablation_arms_leave_out_what_they_name(monkeypatch):
    """`ablate_decode_step`: arms parse to kernel classes (unknown names are errors); leaving a class
    out swaps its function in the decode step's modules for a stand-in with the real output's shape."""
    import torch

    import engine.decode_fused as fused
    import engine.decode_step as step
    from ablate_decode_step import CLASSES, DEFAULT_ARMS, leave_out, parse_arm
    from kernels.finch_mix_reference import finch_mix_reference

    assert parse_arm("all") == () and parse_arm("mix+attn") == ("mix", "attn")
    assert all(parse_arm(a) or a == "all" for a in DEFAULT_ARMS.split(","))
    with pytest.raises(ValueError, match="unknown kernel classes \\['gelu'\\]"):
        parse_arm("mix+gelu")
    real = {name: getattr(fused, name) for name in ("finch_mix", "finch_wkv_decode", "decode_norm_mix", "decode_gemv")}
    real_attention = step.paged_attention
    leave_out(parse_arm("all"), monkeypatch.setattr)
    assert all(getattr(fused, n) is f for n, f in real.items()) and step.paged_attention is real_attention
    leave_out(CLASSES, monkeypatch.setattr)
    assert all(getattr(fused, n) is not f for n, f in real.items()) and step.paged_attention is not real_attention
    xa, prev, h = torch.randn(2, 48), torch.randn(2, 48), torch.randn(2, 5 * 8)
    w2, maa = torch.randn(5, 8, 48), torch.randn(5, 48)
    assert fused.finch_mix(xa, prev, h, w2, maa, False).shape == finch_mix_reference(xa, prev, h, w2, maa, False).shape
    out = torch.zeros(2, 16)
    assert fused.decode_gemv(xa, torch.randn(16, 48), out, 2) is out
    assert fused.finch_wkv_decode(xa).shape == xa.shape
    assert step.paged_attention(torch.randn(1, 4, 8)).shape == (1, 4, 8)


def test_commit_id_names_result_files_only_with_a_commit_like_name(monkeypatch):
    from gpu_timing import commit_id

    monkeypatch.setenv("GOLDFINCH_COMMIT", "5c94129")
    assert commit_id() == "5c94129"
    monkeypatch.setenv("GOLDFINCH_COMMIT", "ref: refs/heads/main")  # a .git/HEAD line passed by mistake
    with pytest.raises(ValueError, match="GOLDFINCH_COMMIT"):
        commit_id()
    monkeypatch.delenv("GOLDFINCH_COMMIT")
    assert commit_id()  # the checkout's HEAD, or "unknown" outside a git checkout
