"""Where an engine prefill waits for the GPU, and how much GPU time it has: one request of PROMPT
tokens at a step token budget, at the 1.5B shape (random weights, bf16) on the GPU.

    python benchmarks/profile_engine_prefill.py [--budget 2048] [--prompt 4096] [--rows 25]

Prints every synchronising call of the timed request with its stack (CUDA's sync debug mode: the
host stops running ahead there), then the wall time against the summed kernel time under the
PyTorch profiler and the kernels by GPU time, then the wall time unprofiled.
"""
from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_engine_prefill import time_to_first_token  # noqa: E402

from engine.config_engine import EngineConfig  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402


def sync_points(engine: LLMEngine, prompt: list[int]) -> dict[str, int]:
    """Stacks (this project's frames) of the synchronising calls of one request, with counts."""
    seen: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message).lower() or "prototype" in str(message):
            return  # not a synchronising call (the mode's own notice that it is a prototype)
        stack = "".join(f for f in traceback.format_stack()[:-2] if "engine" in f or "kernels" in f)
        seen[stack[-600:]] = seen.get(stack[-600:], 0) + 1

    shown, warnings.showwarning = warnings.showwarning, record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            time_to_first_token(engine, [prompt])
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = shown
    return seen


def main() -> None:
    from torch.profiler import ProfilerActivity, profile

    from engine.model import GoldFinchModel
    from engine.random_model import PAPER_1B5_CONFIG, random_checkpoint

    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    model = GoldFinchModel(random_checkpoint(PAPER_1B5_CONFIG, dtype=torch.bfloat16, device="cuda"))
    mc, n = model.config, args.prompt
    kv_bytes_per_token = 2 * mc.n_gold * mc.dim_att * model.emb.element_size()
    engine = LLMEngine(model, None, EngineConfig(
        max_num_seqs=1, max_num_batched_tokens=args.budget, max_model_len=n + 16, cache_tokens=2 * (n + 64),
        kv_working_set_bytes=(n + 256) * kv_bytes_per_token, cuda_graphs=False))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, mc.vocab_size, (n,), generator=gen).tolist() for _ in range(4)]
    time_to_first_token(engine, [prompts[0]])  # warm-up: compiles
    for stack, count in sync_points(engine, prompts[1]).items():
        print(f"--- {count} synchronising call(s) at:\n{stack}")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        seconds, steps, _ = time_to_first_token(engine, [prompts[2]])
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(f"profiled: wall {seconds * 1e3:.1f} ms, {steps} steps, {len(kernels)} kernels, "
          f"kernel time {sum(e.device_time for e in kernels) / 1e3:.1f} ms")
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=args.rows))
    seconds, _, _ = time_to_first_token(engine, [prompts[3]])
    print(f"unprofiled: wall {seconds * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
