"""The sampler on a step's logits at the 1.5B shape's vocabulary (65,536, bf16), on the GPU: its one
kernel path (`kernels.token_sample`, with `kernels.top_p_threshold` for top-p) against its torch
path (the noise hash compiled, as the engine runs it), for OpenAI's default parameters
(temperature 1) and a common top-p setting (temperature 0.8, top_p 0.95):

    python benchmarks/bench_sampler.py [--batches 1,8,64,256] [--out benchmarks/results]

Each arm timed as GPU time (replayed from a CUDA graph: `gpu_timing.graph_ms`) and as launched from
Python (median of CUDA-event timings); the tokens of both arms are compared on every case.
"""
from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpu_timing import card_info, commit_id, graph_ms, median_ms, write_result  # noqa: E402

from engine.sampler import Sampler, make_sampling_batch  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

V = 65536
MODES = {"temperature 1": SamplingParams(temperature=1.0),
         "temperature 0.8, top_p 0.95": SamplingParams(temperature=0.8, top_p=0.95)}


def _time(fn) -> tuple[float, float | None]:
    eager = median_ms(fn, warmup=5, repeats=30)
    try:
        return eager, graph_ms(fn, inner=20, repeats=10)
    except RuntimeError as e:  # an arm that cannot be captured still has its eager time
        print(f"  graph capture failed: {e}")
        return eager, None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    fused, torch_path = Sampler(), Sampler(compile_noise=True)
    torch_path.fused_applies = lambda logits, batch: False
    rows = []
    for B in (int(b) for b in args.batches.split(",")):
        logits = (torch.randn(B, V, generator=torch.Generator().manual_seed(B)) * 3).to(torch.bfloat16).cuda()
        for mode, params in MODES.items():
            batch = make_sampling_batch([params] * B, [[]] * B, [[1]] * B, [5] * B, V, "cuda", seeds=list(range(B)))
            same = torch.equal(fused(logits, batch).token_ids, torch_path(logits, batch).token_ids)
            f_eager, f_graph = _time(lambda: fused(logits, batch))
            t_eager, t_graph = _time(lambda: torch_path(logits, batch))
            rows.append(dict(batch=B, mode=mode, same_tokens=same, fused_ms=f_graph, fused_eager_ms=f_eager,
                             torch_ms=t_graph, torch_eager_ms=t_eager))
            print(rows[-1])
    info, commit = card_info(), commit_id()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.1f}x"  # noqa: E731
    md = [f"# Sampler, one kernel path against the torch path ({info['card']}, commit {commit}, {stamp})", "",
          "| batch | parameters | kernels GPU ms | torch GPU ms | ratio | kernels launched ms | torch launched ms "
          "| same tokens |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        md.append(f"| {r['batch']} | {r['mode']} | {fmt(r['fused_ms'])} | {fmt(r['torch_ms'])} | "
                  f"{ratio(r['torch_ms'], r['fused_ms'])} | {fmt(r['fused_eager_ms'])} | {fmt(r['torch_eager_ms'])} | "
                  f"{r['same_tokens']} |")
    write_result(args.out, f"bench_sampler_{commit}", {**info, "commit": commit, "date": stamp, "rows": rows},
                 "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
