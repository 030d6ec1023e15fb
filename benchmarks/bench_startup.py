"""Start-up as a deployer sees it: how long the engine takes to start at the server's defaults and
how long its first requests take, on a fresh node (empty compile caches) and on a restart (the
caches left by the first start), at the 1.5B shape (random weights, bf16) on the GPU.

    python benchmarks/bench_startup.py [--prompts 4000,4000,1000] [--max-tokens 16] [--temperature 0]
        [--out DIR]

Two child processes share one new folder of compile caches (`TORCHINDUCTOR_CACHE_DIR`,
`TRITON_CACHE_DIR`): the first compiles everything, the second finds it compiled. Each builds the
model, starts an engine with `SERVER_DEFAULTS` (the server's defaults: decode graphs for batch sizes
up to 64, prefill graph buckets up to the 8,192-token prompt-only budget) and then runs the prompts
one after another (`--max-tokens` tokens each, greedy unless `--temperature`), reporting each one's
time to first token and to its last token: kernels and layer functions compile on their first
calls, so a first start pays for some of its compiling in its first requests. Loading real weights
from disk is not included (random weights are made on the device).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpu_timing import commit_id, write_result  # noqa: E402

# `goldfinch-serve`'s defaults as EngineConfig fields (tests/test_bench_report.py checks them against
# server.cli's options)
SERVER_DEFAULTS = dict(max_num_seqs=64, max_num_batched_tokens=2048, prefill_only_batched_tokens=8192,
                       max_model_len=4096, block_size=16, gpu_memory_fraction=0.5)


def first_requests(engine, prompt_lens: list[int], max_tokens: int, vocab: int, temperature: float = 0.0,
                   seed: int = 0) -> list[dict]:
    """Runs one request per prompt length, one after another: each one's seconds to its first and
    its last token, and the tokens it produced. A temperature above 0 samples (the first sampled
    request on CUDA also compiles the sampler's noise function)."""
    from engine.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in prompt_lens:
        prompt = torch.randint(0, vocab, (n,), generator=gen).tolist()
        t0 = time.perf_counter()
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True, seed=seed)
        rid = engine.add_request(prompt, params)
        first = None
        tokens = 0
        while rid in engine.requests:
            for update in engine.step():
                if update.request_id == rid:
                    tokens += sum(len(d.token_ids) for d in update.deltas)
                    if first is None and tokens:
                        first = time.perf_counter() - t0
        rows.append({"prompt": n, "ttft_s": first, "total_s": time.perf_counter() - t0, "tokens": tokens})
    return rows


def measure(model, config, prompt_lens: list[int], max_tokens: int, temperature: float = 0.0) -> dict:
    """Engine start-up seconds and the first requests (`first_requests`) for a built model."""
    from engine.engine import LLMEngine

    t0 = time.perf_counter()
    engine = LLMEngine(model, None, config)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    started = time.perf_counter() - t0
    return {"engine_start_s": started,
            "requests": first_requests(engine, prompt_lens, max_tokens, model.config.vocab_size, temperature)}


def _child(prompt_lens: list[int], max_tokens: int, temperature: float) -> None:
    from engine.config_engine import EngineConfig
    from engine.model import GoldFinchModel
    from engine.random_model import PAPER_1B5_CONFIG, random_checkpoint

    t0 = time.perf_counter()
    model = GoldFinchModel(random_checkpoint(PAPER_1B5_CONFIG, dtype=torch.bfloat16, device="cuda"))
    torch.cuda.synchronize()
    built = time.perf_counter() - t0
    result = measure(model, EngineConfig(**SERVER_DEFAULTS), prompt_lens, max_tokens, temperature)
    print("RESULT " + json.dumps({"model_build_s": built, **result}), flush=True)


def render_markdown(result: dict) -> str:
    lines = [f"# Start-up ({result['card']}, commit {result['commit']}, {result['date']})", "",
             "Engine at the server's defaults; "
             f"{result['max_tokens']} tokens a request at temperature {result.get('temperature', 0.0)}; seconds", "",
             "| start | model (random, on device) | engine start | " +
             " | ".join(f"request {i + 1}: {n} tokens, first / last token" for i, n in enumerate(result["prompts"])) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in result["prompts"]) + " |"]
    for name in ("cold", "warm"):
        run = result.get(name)
        if not run or "error" in run:
            lines.append(f"| {name} | {run.get('error', 'not run') if run else 'not run'} | | |")
            continue
        cells = [f"{r['ttft_s']:.2f} / {r['total_s']:.2f}" if r["ttft_s"] is not None else f"no token / {r['total_s']:.2f}"
                 for r in run["requests"]]
        lines.append(f"| {name} | {run['model_build_s']:.1f} | **{run['engine_start_s']:.1f}** | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", default="4000,4000,1000")  # max_model_len 4,096 with the outputs
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above: sampled requests")
    ap.add_argument("--timeout-s", type=float, default=600)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    prompt_lens = [int(v) for v in args.prompts.split(",")]
    if args.child:
        return _child(prompt_lens, args.max_tokens, args.temperature)
    if not torch.cuda.is_available():
        sys.exit("bench_startup: needs a CUDA device")
    result = {"card": torch.cuda.get_device_name(), "commit": commit_id(), "date": time.strftime("%Y-%m-%d"),
              "prompts": prompt_lens, "max_tokens": args.max_tokens, "temperature": args.temperature,
              "defaults": SERVER_DEFAULTS}
    with tempfile.TemporaryDirectory() as caches:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{caches}/inductor", "TRITON_CACHE_DIR": f"{caches}/triton"}
        for name in ("cold", "warm"):
            cmd = [sys.executable, __file__, "--child", "--prompts", args.prompts, "--max-tokens", str(args.max_tokens),
                   "--temperature", str(args.temperature)]
            try:
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout_s)
                lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
                result[name] = json.loads(lines[-1][7:]) if lines else {"error": done.stderr.strip()[-500:]}
            except subprocess.TimeoutExpired:
                result[name] = {"error": f"timed out after {args.timeout_s:.0f} s"}
            print(name, json.dumps(result[name]), flush=True)
    write_result(args.out, f"bench_startup_{commit_id()}", result, render_markdown(result))


if __name__ == "__main__":
    main()
