"""Decode with the fused blocks (`engine.decode_fused`) against the unfused ones, the fused blocks
without programmatic dependent launch (`kernels.pdl`), and the fused blocks with every token through
the sampler (not the greedy choice made in the step), in one process, at the 1.5B shape (random
weights, bf16) on the GPU.

    python benchmarks/bench_decode_fused.py [--cases 1x4096,8x4096,16x4096,1x131072] [--rounds 2]
        [--arms unfused,fused_no_pdl,fused_sampler,fused] [--out DIR]

Each case BATCHxCONTEXT decodes through the engine as `bench_model.py --decode` does (K/V working
sets, decode steps replayed from CUDA graphs); the arms alternate within each round on one model,
the engine rebuilt per arm (so the decode step and its graphs are). Reported: the graph replay time
of one step and tokens per second, per arm and round, and the fused arm's speed-up over each.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_model import bench_decode  # noqa: E402
from gpu_timing import commit_id, write_result  # noqa: E402

import engine.decode_step as decode_step  # noqa: E402
from engine.model import GoldFinchModel  # noqa: E402
from engine.random_model import PAPER_1B5_CONFIG, random_checkpoint  # noqa: E402
from engine.step_sampling import StepSampling  # noqa: E402
from kernels import pdl  # noqa: E402

ARMS = ("unfused", "fused_no_pdl", "fused_sampler", "fused")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="1x4096,8x4096,16x4096,1x131072")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=480)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    if unknown := [a for a in arms if a not in ARMS]:
        ap.error(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
    cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
    deadline = time.monotonic() + args.budget_s
    supported = decode_step.fused_supported
    greedy_applies = StepSampling.__dict__["greedy_applies"]  # the staticmethod itself, to put back
    model = GoldFinchModel(random_checkpoint(PAPER_1B5_CONFIG, dtype=torch.bfloat16, device="cuda"))
    rows: dict[tuple[int, int], dict[str, list]] = {}
    try:
        for _ in range(args.rounds):
            for arm in arms:
                decode_step.fused_supported = supported if arm != "unfused" else (lambda cfg: False)
                os.environ[pdl.ENV_VAR] = "0" if arm == "fused_no_pdl" else "1"
                StepSampling.greedy_applies = (staticmethod(lambda *a: False) if arm == "fused_sampler"
                                               else greedy_applies)
                for r in bench_decode(model, [(b, c, "sets") for b, c in cases], deadline):
                    if "graph_ms" in r:
                        rows.setdefault((r["batch"], r["context"]), {}).setdefault(arm, []).append(
                            (round(r["graph_ms"], 4), round(r["tok_per_s"], 1)))
                torch.cuda.empty_cache()
    finally:
        decode_step.fused_supported = supported
        StepSampling.greedy_applies = greedy_applies
        os.environ.pop(pdl.ENV_VAR, None)
    device = torch.cuda.get_device_name()
    lines = [f"# Decode, fused vs unfused blocks ({device}, commit {commit_id()}, {time.strftime('%Y-%m-%d')})", "",
             f"PDL for launches of at most {pdl.MAX_ROWS} rows; graph ms of one step (tok/s through the engine, "
             "host included) per round", "",
             "(fused, sampler: every token through the sampler, not the step's greedy choice)", "",
             "| batch x context | unfused | fused, no PDL | fused, sampler | fused | fused vs unfused | fused vs no PDL "
             "| fused vs sampler, engine tok/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (b, c), arms in sorted(rows.items()):
        cell = lambda a: ", ".join(f"{ms:.3f} ({tps:,.0f})" for ms, tps in arms.get(a, []))  # noqa: E731
        med = {a: sorted(ms for ms, _ in arms[a])[len(arms[a]) // 2] for a in ARMS if arms.get(a)}
        ratio = lambda a: f"{med[a] / med['fused']:.3f}x" if a in med and "fused" in med else "-"  # noqa: E731
        tps = {a: sorted(t for _, t in arms[a])[len(arms[a]) // 2] for a in ARMS if arms.get(a)}
        engine_ratio = f"{tps['fused'] / tps['fused_sampler']:.3f}x" if "fused" in tps and "fused_sampler" in tps else "-"
        lines.append(f"| {b} x {c} | {cell('unfused')} | {cell('fused_no_pdl')} | {cell('fused_sampler')} "
                     f"| {cell('fused')} | {ratio('unfused')} | {ratio('fused_no_pdl')} | {engine_ratio} |")
    result = {"device": device, "commit": commit_id(), "cases": [
        {"batch": b, "context": c, **arms} for (b, c), arms in sorted(rows.items())]}
    write_result(args.out, f"bench_decode_fused_{commit_id()}", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
