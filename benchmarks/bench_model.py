"""Whole-model benchmarks at the paper's 1.5B shape (random weights, bf16), with the card's own
roofline and a same-size Llama (HF transformers, SDPA) measured in the same run.

    python benchmarks/bench_model.py [--budget-s 420] [--out DIR] [--no-llama]

Writes bench_model.json and bench_model.md (to --out, default $OUT or .) with card, commit, date.
Every section has a time budget; a section that would not fit is reported as skipped. Each decode
case runs in a process of its own (`bench_decode_isolated`; `--one-process` to share this one)."""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.model import GoldFinchModel  # noqa: E402
from engine.random_model import PAPER_1B5_CONFIG, random_checkpoint  # noqa: E402
from gpu_timing import commit_id, write_result  # noqa: E402
from roofline import decode_floor  # noqa: E402


def timed(fn, repeat: int = 1) -> float:
    """Median seconds of fn() over `repeat` runs after one warm-up, synchronised."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def card_roofline() -> dict:
    n = 1 << 28
    a, b = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    t = timed(lambda: b.copy_(a), 5)
    x = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    tm = timed(lambda: x @ x, 5)
    del a, b, x
    return {"copy_GBps": 2 * n / t / 1e9, "bf16_TFLOPs": 2 * 8192 ** 3 / tm / 1e12}


def bench_prefill(model: GoldFinchModel, lengths: list[int], deadline: float, chunk: int = 131072) -> list[dict]:
    """One request per length; prompts longer than `chunk` are fed in chunks with the state carried
    (chunked prefill: a 1M-token pass in one piece would need ~60 GB of activations); only the last
    chunk runs the GOLD layers (`model.forward(logits=False)`, what the engine does)."""
    out = []
    for T in lengths:
        if time.monotonic() > deadline:
            out.append({"T": T, "skipped": "time budget"})
            continue
        tokens = torch.randint(0, model.config.vocab_size, (1, T), device="cuda")

        def run():
            state = None
            for start in range(0, T, chunk):  # chunks before the last skip the GOLD layers, as in the engine
                _, state = model.forward(tokens[:, start:start + chunk], state, logits=start + chunk >= T)

        try:
            torch.cuda.reset_peak_memory_stats()
            t = timed(run, 3) if T <= chunk else _once(run)
            out.append({"T": T, "seconds": t, "tok_per_s": T / t, "chunk": min(T, chunk),
                        "peak_GiB": torch.cuda.max_memory_allocated() / 2 ** 30})
        except torch.OutOfMemoryError as exc:
            out.append({"T": T, "skipped": f"out of memory: {str(exc)[:80]}"})
        torch.cuda.empty_cache()
        print(json.dumps({"prefill": out[-1]}), flush=True)
    return out


def _once(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_decode(model: GoldFinchModel, cases: list[tuple[int, int, str]], deadline: float, steps: int = 16,
                 roofline: dict | None = None, profile: bool = False) -> list[dict]:
    """Decode through the engine (scheduler, sampler, paged pool): `batch` requests with `ctx`-token
    prompts; after every prompt is prefilled, `steps` steps are timed. Mode "sets": K/V working
    sets sized for the case (up to the free memory less 8 GiB), decode steps replayed from CUDA
    graphs; "derive": no working sets, every step derives keys from the compressed cache."""
    from engine.config_engine import EngineConfig
    from engine.engine import LLMEngine
    from engine.sampling_params import SamplingParams

    out = []
    mc = model.config
    kv_bytes_per_token = 2 * mc.n_gold * mc.dim_att * 2
    for batch, ctx, mode in cases:
        if time.monotonic() > deadline:
            out.append({"batch": batch, "context": ctx, "mode": mode, "skipped": "time budget"})
            continue
        engine = None
        try:
            budget = max(ctx, 8192)
            # every request must still be decoding when the timed steps start: the first ones begin
            # decoding while the last prompts are still being prefilled
            max_tokens = batch * ctx // budget + steps + 16
            free, _ = torch.cuda.mem_get_info()
            want = batch * (ctx + max_tokens + 128) * kv_bytes_per_token
            # headroom: the activations of a prefill chunk of `budget` tokens (~90 KB per token at
            # this shape, measured: 11.5 GiB peak at 128K) and the compressed pool
            headroom = (4 << 30) + budget * 100_000 + batch * (ctx + max_tokens) * 300
            ws_bytes = 0 if mode == "derive" else int(min(want, free - headroom))
            t_init = time.perf_counter()
            engine = LLMEngine(model, None, EngineConfig(
                max_num_seqs=batch, max_num_batched_tokens=budget, max_model_len=ctx + max_tokens,
                cache_tokens=batch * (ctx + max_tokens + 16), kv_working_set_bytes=max(0, ws_bytes)))
            init_s = time.perf_counter() - t_init
            gen = torch.Generator().manual_seed(batch)
            for _ in range(batch):
                engine.add_request(torch.randint(0, model.config.vocab_size, (ctx,), generator=gen).tolist(),
                                   SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
            while any(s.is_prefilling or not s.output_token_ids for s in engine.scheduler.running) \
                    or engine.scheduler.waiting:
                engine.step()
            running = list(engine.scheduler.running)
            if len(running) != batch:
                raise RuntimeError(f"only {len(running)} of {batch} requests decoding (see the log)")
            n_steps = steps if mode == "sets" or batch * ctx <= 65536 else 2
            engine.step()  # the first decode step after prefill builds missing working sets
            generated = sum(len(s.output_token_ids) for s in running)
            fast_before = engine.runner.num_fast_steps
            torch.cuda.synchronize()
            prof = None
            if profile:
                import cProfile
                prof = cProfile.Profile()
                prof.enable()
            t0 = time.perf_counter()
            for _ in range(n_steps):
                engine.step()
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / n_steps
            generated = sum(len(s.output_token_ids) for s in running) - generated
            assert generated == batch * n_steps, f"{generated} tokens in {n_steps} steps of {batch}"
            if prof is not None:
                import pstats
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(22)
            sets = engine.runner.working_sets
            held = len(sets) if sets else 0
            row = {"batch": batch, "context": ctx, "mode": mode, "step_ms": dt * 1e3, "tok_per_s": batch / dt,
                   "fast_steps": engine.runner.num_fast_steps - fast_before, "timed_steps": n_steps,
                   "working_sets": held, "working_set_GiB": (sets.used_bytes() / 2 ** 30) if sets else 0.0,
                   "engine_init_s": init_s}
            graphs = engine.runner.graphs
            if graphs is not None and row["fast_steps"]:
                # GPU time of the decode step alone: the last step's graph replayed (this corrupts the
                # sequences' states, which are not used again)
                graph, _ = graphs._graphs[next(b for b in graphs.sizes if b >= batch)]
                row["graph_ms"] = timed(graph.replay, 10) * 1e3
            if roofline:  # bytes at the copy bandwidth or FLOPs at the matmul rate (roofline.py)
                floor = decode_floor(mc, batch, ctx, held, roofline["copy_GBps"], roofline["bf16_TFLOPs"])
                row.update(step_GB=floor["bytes"] / 1e9, step_TFLOP=floor["flops"] / 1e12,
                           roofline_tok_per_s=batch / floor["seconds"], of_roofline=floor["seconds"] / dt)
            out.append(row)
            del sets  # or the next case starts with this one's working sets still allocated
        except (torch.OutOfMemoryError, RuntimeError, AssertionError) as exc:
            out.append({"batch": batch, "context": ctx, "mode": mode, "skipped": f"{type(exc).__name__}: {str(exc)[:80]}"})
        del engine
        gc.collect()  # an engine's graphs and pools sit in reference cycles: free them before the next case
        torch.cuda.empty_cache()
        print(json.dumps({"decode": out[-1]}), flush=True)
    return out


def _decode_case_child(case: tuple[int, int, str], deadline: float, steps: int, roofline: dict | None,
                       profile: bool, conn) -> None:
    """One decode case in a process of its own (`bench_decode_isolated`): a fresh model, its row sent back."""
    model = GoldFinchModel(random_checkpoint(PAPER_1B5_CONFIG, dtype=torch.bfloat16, device="cuda"))
    conn.send(bench_decode(model, [case], deadline, steps, roofline, profile)[0])
    conn.close()


def bench_decode_isolated(cases: list[tuple[int, int, str]], deadline: float, steps: int = 16,
                          roofline: dict | None = None, profile: bool = False, child=_decode_case_child) -> list[dict]:
    """`bench_decode` with every case in a fresh process. An engine's GPU memory is not all
    returned when it is deleted (session 10, H100: after the 256 x 4K case, whose working sets took
    51 GiB, every later engine of the same process found no room for working sets and decoded 1 x
    128K at 18.5 tok/s instead of 205), so one case could starve the next; a process of its own
    returns everything when it exits. `child(case, deadline, steps, roofline, profile, conn)` sends
    the case's row through `conn`."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # a forked child would share the parent's CUDA context
    out = []
    for batch, context, mode in cases:
        if time.monotonic() > deadline:
            out.append({"batch": batch, "context": context, "mode": mode, "skipped": "time budget"})
            continue
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=child, args=((batch, context, mode), deadline, steps, roofline, profile, send))
        proc.start()
        send.close()  # the child holds the only sending end: recv() then ends when it exits
        try:
            row = receive.recv()
        except EOFError:  # the child died before sending (a crash, killed for memory)
            row = {"batch": batch, "context": context, "mode": mode, "skipped": "the case's process died"}
        proc.join()
        if proc.exitcode not in (0, None) and "skipped" not in row:
            row["exit_code"] = proc.exitcode
        out.append(row)
        print(json.dumps({"decode": row}), flush=True)
    return out


def capacity(model: GoldFinchModel, session_tokens: int = 32768) -> dict:
    state = model.new_state(1)
    model.forward(torch.zeros(1, 8, dtype=torch.long, device="cuda"), state)
    per_token = state.persistent_bytes_per_token()
    rnn = state.rnn.bytes_per_slot()
    free, total = torch.cuda.mem_get_info()
    per_session = per_token * session_tokens + rnn
    return {"persistent_bytes_per_token": per_token, "rnn_state_bytes": rnn, "free_GiB": free / 2 ** 30,
            "sessions_32k_on_device": int(free // per_session),
            "sessions_32k_keys_on_device_rnn_in_host": int(free // (per_token * session_tokens))}


def bench_llama(lengths: list[int], deadline: float) -> dict:
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return {"skipped": "transformers not installed"}
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=65536, max_position_embeddings=1 << 20)
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e9
    res = {"params_B": params, "prefill": [], "decode": []}
    with torch.inference_mode():
        for T in lengths:
            if time.monotonic() > deadline:
                res["prefill"].append({"T": T, "skipped": "time budget"})
                continue
            ids = torch.randint(0, 65536, (1, T), device="cuda")
            try:
                t = timed(lambda: model(ids, logits_to_keep=1, use_cache=False), 1)
                res["prefill"].append({"T": T, "tok_per_s": T / t})
            except torch.OutOfMemoryError:
                res["prefill"].append({"T": T, "skipped": "out of memory"})
            torch.cuda.empty_cache()
            print(json.dumps({"llama_prefill": res["prefill"][-1]}), flush=True)
        if time.monotonic() < deadline:
            ids = torch.randint(0, 65536, (1, 4096), device="cuda")
            out = model(ids, use_cache=True, logits_to_keep=1)
            past, nxt = out.past_key_values, ids[:, -1:]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(16):
                out = model(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
            torch.cuda.synchronize()
            res["decode"].append({"batch": 1, "context": 4096, "tok_per_s": 16 / (time.perf_counter() - t0)})
    del model
    torch.cuda.empty_cache()
    return res


def _k(x: float) -> str:
    return f"{x / 1000:.1f}K" if x >= 1000 else f"{x:.1f}"


def render_markdown(result: dict) -> str:
    """The run as markdown tables: prefill against the Llama of the same run, decode against the
    roofline of the bytes each step moves, capacity."""
    roof = result.get("roofline", {})
    lines = [f"# bench_model: {result.get('card')}, commit {result.get('commit')}, {result.get('date')}", "",
             f"torch {result.get('torch')}; card measured: copy {roof.get('copy_GBps', 0):,.0f} GB/s, "
             f"bf16 matmul {roof.get('bf16_TFLOPs', 0):.0f} TFLOP/s", ""]
    llama = {r["T"]: r.get("tok_per_s") for r in result.get("llama", {}).get("prefill", [])}
    if result.get("prefill"):
        lines += ["| prompt | tok/s | Llama HF + SDPA tok/s | ratio | peak GiB |", "| --- | --- | --- | --- | --- |"]
        for r in result["prefill"]:
            if "tok_per_s" not in r:
                lines.append(f"| {r['T']} | {r.get('skipped')} | | | |")
                continue
            base = llama.get(r["T"])
            ratio = f"{r['tok_per_s'] / base:.2f}x" if base else "-"
            lines.append(f"| {r['T']} | {_k(r['tok_per_s'])} | {_k(base) if base else '-'} | {ratio} | "
                         f"{r['peak_GiB']:.1f} |")
        lines.append("")
    if result.get("decode"):
        lines += ["| batch x context | mode | tok/s | step ms | graph ms | working sets | roofline tok/s | of roofline |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in result["decode"]:
            case = f"{r['batch']} x {r['context']}"
            if "tok_per_s" not in r:
                lines.append(f"| {case} | {r['mode']} | {r.get('skipped')} | | | | | |")
                continue
            graph = f"{r['graph_ms']:.2f}" if "graph_ms" in r else "-"
            lines.append(f"| {case} | {r['mode']} | {r['tok_per_s']:,.1f} | {r['step_ms']:.2f} | {graph} | "
                         f"{r['working_sets']} of {r['batch']} | {r.get('roofline_tok_per_s', 0):,.0f} | "
                         f"{r.get('of_roofline', 0):.0%} |")
        lines.append("")
    for r in result.get("llama", {}).get("decode", []):
        lines += [f"Llama HF eager decode, batch {r['batch']} at {r['context']}: {r['tok_per_s']:.1f} tok/s", ""]
    cap = result.get("capacity")
    if cap:
        lines += [f"Persistent cache {cap['persistent_bytes_per_token']} B/token; RNN state "
                  f"{cap['rnn_state_bytes'] / 1e6:.2f} MB/sequence; concurrent 32K-token sessions in "
                  f"{cap['free_GiB']:.1f} GiB: {cap['sessions_32k_on_device']:,} (state on the GPU), "
                  f"{cap['sessions_32k_keys_on_device_rnn_in_host']:,} (state in host memory)", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile the timed decode steps")
    ap.add_argument("--one-process", action="store_true",
                    help="run the decode cases in this process (a case may then find the memory of the one before "
                         "still taken); by default each runs in a process of its own")
    ap.add_argument("--prefill", default="4096,16384,65536,131072,1048576")
    ap.add_argument("--decode", default="1x4096,8x4096,64x4096,256x4096,1x131072,16x131072",
                    help="BATCHxCONTEXT cases, with K/V working sets and CUDA graphs")
    ap.add_argument("--derive", default="1x4096,8x4096,1x131072",
                    help="cases decoded without working sets (keys derived from the compressed cache)")
    args = ap.parse_args()
    start = time.monotonic()
    deadline = start + args.budget_s
    result = {"card": torch.cuda.get_device_name(), "commit": commit_id(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "roofline": card_roofline()}
    print(json.dumps(result), flush=True)
    model = GoldFinchModel(random_checkpoint(PAPER_1B5_CONFIG, dtype=torch.bfloat16, device="cuda"))
    result["capacity"] = capacity(model)
    lengths = [int(x) for x in args.prefill.split(",") if x]
    result["prefill"] = bench_prefill(model, lengths, start + args.budget_s * 0.45)
    cases = [(*(int(v) for v in c.split("x")), "sets") for c in args.decode.split(",") if c]
    cases += [(*(int(v) for v in c.split("x")), "derive") for c in args.derive.split(",") if c]
    decode_deadline = start + args.budget_s * 0.75
    if args.one_process:
        result["decode"] = bench_decode(model, cases, decode_deadline, roofline=result["roofline"], profile=args.profile)
    del model
    gc.collect()
    torch.cuda.empty_cache()  # before the cases' own processes take the card
    if not args.one_process:
        result["decode"] = bench_decode_isolated(cases, decode_deadline, roofline=result["roofline"],
                                                 profile=args.profile)
    if not args.no_llama:
        result["llama"] = bench_llama([4096, 16384, 65536, 131072], deadline)
    write_result(args.out, "bench_model", result, render_markdown(result))


if __name__ == "__main__":
    main()
