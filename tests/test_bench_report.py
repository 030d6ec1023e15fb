"""The benchmark's markdown report, rendered from a saved GPU run (the rendering runs anywhere)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

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
