"""Prefill as a server user sees it: time to the first token of one request through the engine
(scheduler, prompt chunks of the step's token budget, paged key pool, K/V working set, sampler),
at the 1.5B shape (random weights, bf16) on the GPU.

    python benchmarks/bench_engine_prefill.py [--cases 2048x4096,2048x65536,...] [--modes graphs,eager]
        [--prefill-only N] [--decoding N] [--together N] [--cprofile N] [--out DIR]

A case BUDGETxPROMPT runs a PROMPT-token request in an engine whose `max_num_batched_tokens` is
BUDGET (the server's `--max-num-batched-tokens`, 2048 by default) and whose
`prefill_only_batched_tokens` is `--prefill-only` (the server's default, 8192; 0: BUDGET): the
prompt is fed in chunks of the larger while nothing decodes, of BUDGET tokens beside decoding
requests, the last chunk at least the GOLD tail long. One request first warms the engine up
(compiles the layer functions for the chunk sizes), a second is timed. Each case runs with the
prefill chunks' Finch layers replayed from CUDA graphs (`graphs`, the default) and launched from
Python (`eager`), in the same process. With `--decoding N`, N other requests (256-token prompts)
are decoding when the timed prompt arrives, as on a loaded server: each step then feeds the prompt a
chunk beside N decodes, and the table adds the decode tokens the N produced meanwhile, per second.
With `--together N`, N prompts arrive at once (a burst of requests): the time is until the last has
its first token, the rate N x PROMPT over it. `--cprofile N` prints the N functions of most host time of
each timed request. `bench_model.py` measures `model.forward` instead, in one chunk up to 128K tokens.
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


def time_to_first_token(engine: LLMEngine, prompts: list[list[int]], cprofile: int = 0) -> tuple[float, int, int]:
    """Seconds from adding the requests to the last one's first token, the engine steps taken, and
    the tokens other requests gained meanwhile."""
    import cProfile
    import pstats

    profiler = cProfile.Profile() if cprofile else None
    _sync(engine.model.device)
    if profiler:
        profiler.enable()
    t0 = time.perf_counter()
    rids = {engine.add_request(p, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)) for p in prompts}
    steps = others = 0
    while rids & engine.requests.keys():
        for update in engine.step():
            if update.request_id not in rids:
                others += sum(len(d.token_ids) for d in update.deltas)
        steps += 1
    _sync(engine.model.device)
    seconds = time.perf_counter() - t0
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(cprofile)
    return seconds, steps, others


BACKGROUND_PROMPT, BACKGROUND_TOKENS = 256, 4096


def bench_case(model, budget: int, prompt_len: int, graphs: bool, cprofile: int = 0, decoding: int = 0,
               together: int = 1, seed: int = 0, prefill_only: int = 0) -> dict:
    mc = model.config
    kv_bytes_per_token = 2 * mc.n_gold * mc.dim_att * model.emb.element_size()
    background_len = BACKGROUND_PROMPT + BACKGROUND_TOKENS
    engine = LLMEngine(model, None, EngineConfig(
        max_num_seqs=decoding + together, max_num_batched_tokens=budget, prefill_only_batched_tokens=prefill_only,
        max_model_len=max(prompt_len + 16, background_len),
        cache_tokens=2 * together * (prompt_len + 64) + decoding * background_len,
        kv_working_set_bytes=(together * (prompt_len + 256) + decoding * background_len) * kv_bytes_per_token,
        cuda_graphs=decoding > 0, prefill_graphs=graphs))
    prefill_graphs = engine.runner.prefill_graphs
    gen = torch.Generator().manual_seed(seed)
    prompts = [[torch.randint(0, mc.vocab_size, (prompt_len,), generator=gen).tolist() for _ in range(together)]
               for _ in range(2)]
    for _ in range(decoding):
        engine.add_request(torch.randint(0, mc.vocab_size, (BACKGROUND_PROMPT,), generator=gen).tolist(),
                           SamplingParams(temperature=0, max_tokens=BACKGROUND_TOKENS, ignore_eos=True))
    while any(s.is_prefilling for r in engine.requests.values() for s in r.seqs):
        engine.step()
    time_to_first_token(engine, prompts[0])  # warm-up
    seconds, steps, others = time_to_first_token(engine, prompts[1], cprofile)
    return {"budget": budget, "prefill_only": engine.scheduler.config.max_step_tokens, "prompt": prompt_len,
            "mode": "graphs" if graphs else "eager", "decoding": decoding,
            "together": together, "ttft_s": seconds, "tok_per_s": together * prompt_len / seconds, "steps": steps,
            "decode_tok_per_s": others / seconds,
            "graph_buckets": list(prefill_graphs.buckets) if prefill_graphs else [],
            "graph_replays": prefill_graphs.num_replays if prefill_graphs else 0,
            "split_steps": engine.runner.num_split_steps}


def render_markdown(result: dict) -> str:
    lines = [f"# bench_engine_prefill: {result['card']}, commit {result['commit']}, {result['date']}", "",
             "| step token budget | while none decodes | prompt | prompts at once | prefill chunks | requests decoding "
             "| time to first token | prompt tok/s | engine steps | their decode tok/s meanwhile |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        head = (f"| {r['budget']} | {r.get('prefill_only', r['budget'])} | {r['prompt']} | {r.get('together', 1)} "
                f"| {r['mode']} | {r['decoding']} |")
        if "ttft_s" not in r:
            lines.append(f"{head} {r['skipped']} | | | |")
            continue
        lines.append(f"{head} {r['ttft_s'] * 1e3:.1f} ms | {r['tok_per_s'] / 1e3:.1f}K | {r['steps']} | "
                     f"{r['decode_tok_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def run(model, cases: list[tuple[int, int]], card: str, commit: str, modes: tuple[str, ...] = ("graphs", "eager"),
        cprofile: int = 0, decoding: int = 0, together: int = 1, prefill_only: tuple[int, ...] = (0,)) -> dict:
    import datetime

    result = {"card": card, "commit": commit,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": []}
    for budget, prompt_len in cases:
        for alone in prefill_only:
            for mode in modes:
                try:
                    row = bench_case(model, budget, prompt_len, mode == "graphs", cprofile, decoding, together,
                                     prefill_only=alone)
                except torch.OutOfMemoryError as exc:
                    row = {"budget": budget, "prefill_only": max(budget, alone), "prompt": prompt_len, "mode": mode,
                           "decoding": decoding, "together": together, "skipped": f"out of memory: {str(exc)[:60]}"}
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
    return result


def main() -> None:
    import os

    from engine.model import GoldFinchModel
    from engine.random_model import PAPER_1B5_CONFIG, random_checkpoint

    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="2048x4096,2048x16384,2048x65536,4096x4096,8192x65536,65536x65536")
    ap.add_argument("--modes", default="graphs,eager", help="graphs, eager or both (comma-separated)")
    ap.add_argument("--prefill-only", default="8192",
                    help="the engine's prefill_only_batched_tokens, comma-separated for several (8192: the "
                         "server's default; 0: the case's budget)")
    ap.add_argument("--decoding", type=int, default=0, help="requests decoding while the prompt arrives")
    ap.add_argument("--together", type=int, default=1, help="prompts arriving at once")
    ap.add_argument("--cprofile", type=int, default=0, help="print the N functions of most host time per request")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",") if c]
    model = GoldFinchModel(random_checkpoint(PAPER_1B5_CONFIG, dtype=torch.bfloat16, device="cuda"))
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or set(modes) - {"graphs", "eager"}:
        raise SystemExit(f"--modes: graphs and/or eager, got {args.modes!r}")
    result = run(model, cases, torch.cuda.get_device_name(), commit_id(), modes, args.cprofile, args.decoding,
                 args.together, tuple(int(v) for v in args.prefill_only.split(",") if v))
    write_result(args.out, "bench_engine_prefill", result, render_markdown(result))


if __name__ == "__main__":
    main()
