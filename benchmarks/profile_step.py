"""Kernel-level profile (torch.profiler) of one decode step and one prefill at the 1.5B shape.

    python benchmarks/profile_step.py [--batch 1 (0: prefill only)] [--context 4096] [--prefill 4096,131072] [--rows 30]

Decode: the engine is set up as in bench_model.py; the rows of a real decode step are replayed
through the static decode step launched eagerly (kernels and their GPU times; a CUDA graph
replays the same kernels without the launch gaps). Prefill: `model.forward` over one prompt.
Prints the top kernels by GPU time, the kernel count and GPU-busy vs wall time."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.config_engine import EngineConfig  # noqa: E402
from engine.cuda_graphs import run_eager  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.model import GoldFinchModel  # noqa: E402
from engine.random_model import PAPER_1B5_CONFIG, random_checkpoint  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402


CATEGORIES = (("matmul", ("nvjet", "gemm", "gemv", "splitKreduce", "cutlass", "xmma")), ("wkv", ("wkv6",)),
              ("attention", ("attention", "fmha", "flash")), ("fused (inductor)", ("triton_",)))


def category(name: str) -> str:
    return next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")


def report(prof, title: str, wall_s: float, rows: int = 30) -> None:
    """Kernels only (an aten op's device time is its kernels' again), the top `rows`, and sums by kind."""
    kernels = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0
               and not e.key.startswith(("aten::", "## ", "Command Buffer", "cuda"))]
    total_us = sum(e.self_device_time_total for e in kernels)
    count = sum(e.count for e in kernels)
    print(f"\n## {title}: {count} kernels, GPU busy {total_us / 1e3:.2f} ms, wall {wall_s * 1e3:.2f} ms")
    sums: dict[str, list[float]] = {}
    for e in kernels:
        acc = sums.setdefault(category(e.key), [0.0, 0])
        acc[0] += e.self_device_time_total
        acc[1] += e.count
    for name, (us, n) in sorted(sums.items(), key=lambda kv: -kv[1][0]):
        print(f"  {name:18s} {us / 1e3:8.3f} ms {n:6d} kernels")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:rows]:
        print(f"{e.self_device_time_total / 1e3:8.3f} ms {e.count:6d}x  {e.key[:110]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1, help="decode batch; 0: no decode profile")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--prefill", default="4096", help="comma-separated prompt lengths")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    model = GoldFinchModel(random_checkpoint(PAPER_1B5_CONFIG, dtype=torch.bfloat16, device="cuda"))
    if args.batch > 0:
        profile_decode(model, args)
    profile_prefill(model, args)


def profile_decode(model: GoldFinchModel, args) -> None:
    B, ctx = args.batch, args.context
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=B, max_num_batched_tokens=max(ctx, 8192),
                                                 max_model_len=ctx + 64, cache_tokens=B * (ctx + 80),
                                                 kv_working_set_bytes=B * (ctx + 128) * 65536 + (64 << 20)))
    for _ in range(B):
        engine.add_request(torch.randint(0, 65536, (ctx,)).tolist(),
                           SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    seen = []
    run = engine.runner.graphs.run

    def spy(rows, token_ids=None):
        seen.append(rows)
        return run(rows, token_ids)

    engine.runner.graphs.run = spy
    for _ in range(64):  # the prompt's chunks, then decode steps through the graphs
        if len(seen) >= 3:
            break
        engine.step()
    if len(seen) < 3:
        raise SystemExit("no decode step went through the CUDA graphs")
    rows = seen[-1]
    step = engine.runner.decode_step
    run_eager(step, rows, engine.runner.scratch, model.device)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            run_eager(step, rows, engine.runner.scratch, model.device)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / args.repeat
    report(prof, f"decode step, batch {B}, context {ctx}, eager, {args.repeat} steps", wall, args.rows)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        run(rows)
    end.record()
    torch.cuda.synchronize()
    print(f"graph replay of the same step: {start.elapsed_time(end) / 20:.3f} ms")
    del engine
    torch.cuda.empty_cache()


def profile_prefill(model: GoldFinchModel, args) -> None:
    for T in (int(t) for t in args.prefill.split(",") if t):
        tokens = torch.randint(0, 65536, (1, T), device="cuda")
        model.forward(tokens)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            model.forward(tokens)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        report(prof, f"prefill {T} tokens", wall, args.rows)
        cpu = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
        print("\nhost side (self CPU time):")
        for e in cpu:
            print(f"{e.self_cpu_time_total / 1e3:8.3f} ms {e.count:6d}x  {e.key[:100]}")
        del prof
        torch.cuda.empty_cache()

if __name__ == "__main__":
    main()
