"""Prefill as a server user sees it: time to the first token of one request through the engine
(scheduler, prompt chunks of the step's token budget, paged key pool, K/V working set, sampler),
at the 1.5B shape (random weights, bf16) on the GPU.

    python benchmarks/bench_engine_prefill.py [--cases 2048x4096,2048x16384,8192x16384,16384x65536] [--out DIR]

A case BUDGETxPROMPT runs a PROMPT-token request in an engine whose `max_num_batched_tokens` is
BUDGET (the server's `--max-num-batched-tokens`, 2048 by default): the prompt is fed in chunks of
BUDGET tokens, the last chunk at least the GOLD tail long. One request first warms the engine up
(compiles the layer functions for the chunk sizes), a second is timed. `bench_model.py` measures
`model.forward` instead, in one chunk up to 128K tokens.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpu_timing import commit_id, write_result  # noqa: E402

from engine.config_engine import EngineConfig  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_to_first_token(engine: LLMEngine, prompt: list[int]) -> tuple[float, int]:
    """Seconds from adding the request to its first token, and the engine steps taken."""
    _sync(engine.model.device)
    t0 = time.perf_counter()
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    _sync(engine.model.device)
    return time.perf_counter() - t0, steps


def bench_case(model, budget: int, prompt_len: int, seed: int = 0) -> dict:
    mc = model.config
    kv_bytes_per_token = 2 * mc.n_gold * mc.dim_att * model.emb.element_size()
    engine = LLMEngine(model, None, EngineConfig(
        max_num_seqs=1, max_num_batched_tokens=budget, max_model_len=prompt_len + 16,
        cache_tokens=2 * (prompt_len + 64), kv_working_set_bytes=(prompt_len + 256) * kv_bytes_per_token,
        cuda_graphs=False))
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, mc.vocab_size, (prompt_len,), generator=gen).tolist() for _ in range(2)]
    time_to_first_token(engine, prompts[0])  # warm-up
    seconds, steps = time_to_first_token(engine, prompts[1])
    return {"budget": budget, "prompt": prompt_len, "ttft_s": seconds, "tok_per_s": prompt_len / seconds,
            "steps": steps}


def render_markdown(result: dict) -> str:
    lines = [f"# bench_engine_prefill: {result['card']}, commit {result['commit']}, {result['date']}", "",
             "| step token budget | prompt | time to first token | prompt tok/s | engine steps |",
             "| --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        if "ttft_s" not in r:
            lines.append(f"| {r['budget']} | {r['prompt']} | {r['skipped']} | | |")
            continue
        lines.append(f"| {r['budget']} | {r['prompt']} | {r['ttft_s'] * 1e3:.1f} ms | {r['tok_per_s'] / 1e3:.1f}K | "
                     f"{r['steps']} |")
    return "\n".join(lines) + "\n"


def run(model, cases: list[tuple[int, int]], card: str, commit: str) -> dict:
    import datetime

    result = {"card": card, "commit": commit,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": []}
    for budget, prompt_len in cases:
        try:
            row = bench_case(model, budget, prompt_len)
        except torch.OutOfMemoryError as exc:
            row = {"budget": budget, "prompt": prompt_len, "skipped": f"out of memory: {str(exc)[:60]}"}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    return result


def main() -> None:
    import os

    from engine.model import GoldFinchModel
    from engine.random_model import PAPER_1B5_CONFIG, random_checkpoint

    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="2048x4096,2048x16384,8192x16384,16384x16384,16384x65536")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",") if c]
    model = GoldFinchModel(random_checkpoint(PAPER_1B5_CONFIG, dtype=torch.bfloat16, device="cuda"))
    result = run(model, cases, torch.cuda.get_device_name(), commit_id())
    write_result(args.out, "bench_engine_prefill", result, render_markdown(result))


if __name__ == "__main__":
    main()
