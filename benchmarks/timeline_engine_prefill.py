"""When the host launches each phase of one prompt's prefill through the engine, and when the GPU
gets there: the host time before the first kernel, each chunk's replay, the last step's GOLD layers.

    python benchmarks/timeline_engine_prefill.py [--prompt 4096] [--budget 2048] [--requests 4]

The runner's phases are wrapped to record a host timestamp and a CUDA event each; an event's time is
when the GPU had finished everything queued before it. Where "gpu reached" equals "host", the GPU was
waiting for the host there. The first requests warm up; the last two are printed (ms from
`add_request`).
"""
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


class Timeline:
    def __init__(self) -> None:
        self.marks: list[tuple[str, float, torch.cuda.Event]] = []

    def mark(self, name: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.marks.append((name, time.perf_counter(), event))

    def wrap(self, obj, attr: str, before: str, after: str | None = None) -> None:
        fn = getattr(obj, attr)

        def wrapped(*args, **kwargs):
            self.mark(before)
            out = fn(*args, **kwargs)
            if after:
                self.mark(after)
            return out

        setattr(obj, attr, wrapped)

    def print(self, wall_s: float) -> None:
        h0, e0 = self.marks[0][1], self.marks[0][2]
        print(f"--- wall {wall_s * 1e3:.2f} ms")
        for name, host, event in self.marks:
            print(f"  host {1e3 * (host - h0):7.2f} ms   gpu reached {e0.elapsed_time(event):7.2f} ms   {name}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--requests", type=int, default=4)
    args = ap.parse_args()
    model = GoldFinchModel(random_checkpoint(PAPER_1B5_CONFIG, dtype=torch.bfloat16, device="cuda"))
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=8, max_num_batched_tokens=args.budget,
                                                 max_model_len=args.prompt + 64))
    tl = Timeline()
    tl.wrap(engine.scheduler, "schedule", "schedule")
    tl.wrap(engine.runner, "execute", "runner.execute", "runner.execute returned")
    if engine.runner.prefill_graphs is not None:
        tl.wrap(engine.runner.prefill_graphs, "run", "chunk replay launched", "chunk replay queued")
    tl.wrap(model, "step", "model.step (key write, GOLD layers)", "model.step queued")
    for i in range(args.requests):
        prompt = torch.randint(0, model.config.vocab_size, (args.prompt,)).tolist()  # before the first mark
        tl.marks.clear()
        torch.cuda.synchronize()
        tl.mark("add_request")
        rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        while rid in engine.requests:
            engine.step()
            tl.mark("engine.step returned")
        torch.cuda.synchronize()
        if i >= args.requests - 2:
            tl.print(time.perf_counter() - tl.marks[0][1])


if __name__ == "__main__":
    main()
