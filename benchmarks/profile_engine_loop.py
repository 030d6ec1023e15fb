"""How a steady decode loop of the engine uses the GPU (1.5B shape, bf16), without a profiler's
overhead: CUDA events around each decode graph replay and each sampler launch.

    python benchmarks/profile_engine_loop.py [--batch 1] [--context 4096] [--steps 20] [--no-overlap]
        [--temperature 0] [--top-p 1]

Prints wall time per step, the GPU time of the graphs and of the sampler, and the GPU time between
them (input copies, logits conversion, and any idling while the host prepares the next step)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.config_engine import EngineConfig  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.model import GoldFinchModel  # noqa: E402
from engine.random_model import PAPER_1B5_CONFIG, random_checkpoint  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402


class TimedGraph:
    def __init__(self, graph, marks: list) -> None:
        self.graph, self.marks = graph, marks

    def replay(self) -> None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.graph.replay()
        end.record()
        self.marks.append(("graph", start, end))


def instrument(engine: LLMEngine) -> list:
    marks: list = []
    graphs = engine.runner.graphs
    graphs._graphs = {b: (TimedGraph(g, marks), out) for b, (g, out) in graphs._graphs.items()}
    launch = engine.sampling.launch

    def timed_sampling(*args, **kwargs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = launch(*args, **kwargs)
        end.record()
        marks.append(("sampler", start, end))
        return out

    engine.sampling.launch = timed_sampling
    return marks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-overlap", action="store_true")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the step's own choice)")
    ap.add_argument("--top-p", type=float, default=1.0)
    args = ap.parse_args()
    model = GoldFinchModel(random_checkpoint(PAPER_1B5_CONFIG, dtype=torch.bfloat16, device="cuda"))
    B, ctx = args.batch, args.context
    engine = LLMEngine(model, None, EngineConfig(
        max_num_seqs=B, max_num_batched_tokens=max(ctx, 8192), max_model_len=ctx + 128, cache_tokens=B * (ctx + 144),
        kv_working_set_bytes=B * (ctx + 192) * 65536 + (64 << 20), overlap_decode=not args.no_overlap))
    for _ in range(B):
        engine.add_request(torch.randint(0, 65536, (ctx,)).tolist(),
                           SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=1, max_tokens=100,
                                          ignore_eos=True))
    while any(s.is_prefilling or not s.output_token_ids for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(4):
        engine.step()
    marks = instrument(engine)
    overlapped = engine.stats.overlapped_steps
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.steps * 1e3
    per = {}
    for name, start, end in marks:
        per.setdefault(name, []).append(start.elapsed_time(end))
    between = sum(max(0.0, a[2].elapsed_time(b[1])) for a, b in zip(marks, marks[1:])) / args.steps
    print(f"batch {B} x {ctx}, temperature {args.temperature}, top_p {args.top_p}, "
          f"overlap {'off' if args.no_overlap else 'on'} "
          f"({engine.stats.overlapped_steps - overlapped} of {args.steps} steps launched ahead): wall {wall:.2f} ms/step; "
          + "; ".join(f"{k} {sum(v) / len(v):.3f} ms x{len(v)}" for k, v in per.items())
          + f"; GPU time between them {between:.3f} ms/step")


if __name__ == "__main__":
    main()
