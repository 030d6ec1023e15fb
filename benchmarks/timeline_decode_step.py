"""One decode step's kernels in launch order with their GPU times, at the 1.5B shape (random weights,
bf16) on the GPU, and the step's CUDA-graph replay time.

    python benchmarks/timeline_decode_step.py [BATCH (1)] [CONTEXT (4096)]

The engine decodes BATCH requests of CONTEXT-token prompts until the decode graphs run; the last
step's rows are then launched once eagerly under the profiler (the graph replays the same kernels
without the launch gaps). Also printed: what a graph of tiny kernels costs per kernel, the floor
of a kernel-bound step. (`profile_step.py` sums the kernels by name instead.)
"""
from __future__ import annotations

import sys
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


def _graph_ms(fn, reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        fn()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def tiny_kernel_us(n: int) -> float:
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            y = x
            for _ in range(n):
                y = y * 1.0001
    return _graph_ms(graph.replay, 20) * 1e3 / n


def main() -> None:
    B = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    ctx = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
    model = GoldFinchModel(random_checkpoint(PAPER_1B5_CONFIG, dtype=torch.bfloat16, device="cuda"))
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=B, max_num_batched_tokens=8192, max_model_len=ctx + 64,
                                                 cache_tokens=B * (ctx + 80),
                                                 kv_working_set_bytes=B * (ctx + 128) * 65536 + (64 << 20)))
    for _ in range(B):
        engine.add_request(torch.randint(0, 65536, (ctx,)).tolist(),
                           SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    seen, run = [], engine.runner.graphs.run

    def spy(rows, token_ids=None):
        seen.append(rows)
        return run(rows, token_ids)

    engine.runner.graphs.run = spy
    while len(seen) < 3:
        engine.step()
    rows, step = seen[-1], engine.runner.decode_step
    run_eager(step, rows, engine.runner.scratch, model.device)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_eager(step, rows, engine.runner.scratch, model.device)
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    print(f"kernels in one step: {len(events)}, sum {sum(e.time_range.elapsed_us() for e in events) / 1e3:.3f} ms")
    t0 = events[0].time_range.start
    for i, e in enumerate(events):
        print(f"{i:4d} {e.time_range.start - t0:9.1f} {e.time_range.elapsed_us():7.1f}  {e.name[:90]}")
    print(f"graph replay: {_graph_ms(lambda: run(rows), 50):.3f} ms")
    for n in (100, 300):
        print(f"graph of {n} tiny kernels: {tiny_kernel_us(n):.2f} us per kernel")


if __name__ == "__main__":
    main()
