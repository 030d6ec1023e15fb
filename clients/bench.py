"""`goldfinch-bench`: a load generator for any OpenAI-compatible server, after vLLM's `bench serve`.

Sends `--num-prompts` streamed requests (SSE) at Poisson arrivals of `--request-rate` per second
(inf: all at once), at most `--max-concurrency` in flight, and measures from the raw stream:
TTFT (time to first token), ITL (gaps between streamed chunks), TPOT (time per output token
after the first) and end-to-end latency. Token counts come from the server's usage chunk
(`stream_options.include_usage`), so they are the server's own numbers.

Prompts are random token ids (completions; exact input lengths) unless `--prompt-text` or
`--endpoint chat` asks for random words. `ignore_eos` makes output lengths exact: pass
`--no-ignore-eos` for servers that refuse the extension.

    goldfinch-bench --url http://127.0.0.1:8000 --num-prompts 200 --request-rate 8 \\
        --input-len 512 --output-len 128 --result-json result.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm

from .client import server_root

WORDS = tuple(("the of and to in is was for on that with as by at from his her be this have not are but had "
               "they which one you were all we she there an been has when who will more no if out so said "
               "what up its about into than them can only other new some could time these two may then do "
               "first any my now such like our over man me even most made after also did many before must "
               "through back years where much your way well down should because each just those people").split())


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""  # the HTTP status ("429") or the failure's kind ("timeout", "stream_error", ...)
    prompt_tokens: int = 0
    output_tokens: int = 0
    usage_reported: bool = False
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="goldfinch-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="server URL, with or without /v1")
    ap.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY") or os.environ.get("GOLDFINCH_API_KEY"),
                    help="API key [env OPENAI_API_KEY, GOLDFINCH_API_KEY]")
    ap.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    ap.add_argument("--num-prompts", type=int, default=100)
    ap.add_argument("--request-rate", type=float, default=math.inf,
                    help="requests/s, Poisson arrivals (inf: all at once)")
    ap.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    ap.add_argument("--input-len", type=int, default=128, help="prompt tokens (words with --prompt-text or chat)")
    ap.add_argument("--output-len", type=int, default=128, help="max_tokens of every request")
    ap.add_argument("--prompt-text", action="store_true", help="random words instead of random token ids")
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="draw token ids from [0, N) (default: ids of words tokenized by the server's /tokenize)")
    ap.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                    help="do not send ignore_eos (for servers without the extension; output lengths vary)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrival times")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="the whole run's limit; unfinished requests fail")
    ap.add_argument("--result-json", default=None, help="write the results here as JSON")
    ap.add_argument("--disable-tqdm", action="store_true")
    args = ap.parse_args(argv)
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.request_rate <= 0 or (args.max_concurrency is not None and args.max_concurrency < 1):
        ap.error("--request-rate and --max-concurrency must be positive")
    return args


async def make_prompts(http: httpx.AsyncClient, args: argparse.Namespace, model: str) -> list:
    """Token-id prompts of exactly --input-len ids, or word prompts of about that many tokens.

    Ids come from tokenizing words on the server itself (they exist in its vocabulary, whatever its
    size) unless --vocab-size is given; /tokenize generates nothing, so it leaves the server's
    token counters untouched. Without /tokenize, prompts fall back to words.
    """
    rng = random.Random(args.seed)
    text_mode = args.prompt_text or args.endpoint == "chat"
    if not text_mode and args.vocab_size:
        return [[rng.randrange(args.vocab_size) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    pool: list[int] = []
    if not text_mode:
        r = await http.post("/tokenize", json={"model": model, "prompt": " ".join(WORDS)})
        if r.status_code == 200:
            pool = sorted(set(r.json().get("tokens", [])))
        else:
            print(f"/tokenize answered {r.status_code}: sending word prompts (lengths approximate)", file=sys.stderr)
    if pool:
        return [[rng.choice(pool) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    prompts = [" ".join(rng.choice(WORDS) for _ in range(args.input_len)) for _ in range(args.num_prompts)]
    return [{"role": "user", "content": p} for p in prompts] if args.endpoint == "chat" else prompts


def payload(args: argparse.Namespace, model: str, prompt) -> dict:
    body = {"model": model, "max_tokens": args.output_len, "temperature": args.temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "chat":
        body["messages"] = [prompt]
    else:
        body["prompt"] = prompt
    return body


async def send(http: httpx.AsyncClient, path: str, body: dict, result: RequestResult) -> None:
    """One streamed request. Text arrival times are taken as the SSE lines are read, before any
    JSON work, so the numbers are the wire's. Fills `result` in place: a request cancelled at the
    deadline keeps what it measured."""
    start = time.perf_counter()
    last = start
    chunks_with_text = 0
    async with http.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            result.error = str(response.status_code)
            return
        done = False
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            now = time.perf_counter()
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                result.error = "stream_error"
                return
            if event.get("usage"):
                result.prompt_tokens = int(event["usage"].get("prompt_tokens") or 0)
                result.output_tokens = int(event["usage"].get("completion_tokens") or 0)
                result.usage_reported = True
            for choice in event.get("choices") or []:
                text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                if text:
                    if chunks_with_text == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    chunks_with_text += 1
                    last = now
        result.e2e = time.perf_counter() - start
        if not done:
            result.error = "incomplete_stream"
            return
    if not result.usage_reported:  # a server without include_usage: chunks stand in for tokens
        result.output_tokens = chunks_with_text
        result.prompt_tokens = len(body["prompt"]) if isinstance(body.get("prompt"), list) else 0
    if chunks_with_text == 0:  # tokens without text (or none): the first came by the end at the latest
        result.ttft = result.e2e
    result.ok = True


async def run_benchmark(args: argparse.Namespace) -> dict:
    """Runs the load and returns the summary (what --result-json holds)."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency or args.num_prompts, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=server_root(args.url), headers=headers, limits=limits,
                                 timeout=httpx.Timeout(args.timeout_s, connect=min(30.0, args.timeout_s))) as http:
        model = args.model
        if model is None:
            r = await http.get("/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        prompts = await make_prompts(http, args, model)
        path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
        results = [RequestResult() for _ in prompts]
        gate = asyncio.Semaphore(args.max_concurrency or len(prompts))
        bar = tqdm(total=len(prompts), disable=args.disable_tqdm, unit="req")
        rng = random.Random(args.seed + 1)

        async def one(i: int) -> None:
            async with gate:
                try:
                    await send(http, path, payload(args, model, prompts[i]), results[i])
                except httpx.TimeoutException:
                    results[i].error = "timeout"
                except (httpx.HTTPError, ValueError) as exc:  # connection lost, unparsable event, ...
                    results[i].error = type(exc).__name__
                finally:
                    bar.update(1)

        async def launch(tasks: list[asyncio.Task]) -> None:
            for i in range(len(prompts)):
                tasks.append(asyncio.create_task(one(i)))
                if math.isfinite(args.request_rate) and i + 1 < len(prompts):
                    await asyncio.sleep(rng.expovariate(args.request_rate))
            await asyncio.gather(*tasks)

        tasks: list[asyncio.Task] = []
        start = time.perf_counter()
        try:
            await asyncio.wait_for(launch(tasks), args.timeout_s)
        except asyncio.TimeoutError:
            pass  # wait_for cancelled what was still running: those requests count as timed out
        duration = time.perf_counter() - start
        bar.close()
    for r in results:
        if not r.ok and not r.error:
            r.error = "timeout"
    return summarize(args, model, results, duration)


def _stats(name: str, values_s: list[float]) -> dict:
    """mean/median/p99 in milliseconds (vLLM's keys); p99 by linear interpolation, as numpy does."""
    if not values_s:
        return {f"{k}_{name}_ms": 0.0 for k in ("mean", "median", "p99")}
    v = sorted(x * 1000.0 for x in values_s)

    def pct(p: float) -> float:
        pos = (len(v) - 1) * p / 100.0
        lo = math.floor(pos)
        return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo)

    return {f"mean_{name}_ms": sum(v) / len(v), f"median_{name}_ms": pct(50), f"p99_{name}_ms": pct(99)}


def summarize(args: argparse.Namespace, model: str, results: list[RequestResult], duration: float) -> dict:
    done = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    total_in = sum(r.prompt_tokens for r in done)
    total_out = sum(r.output_tokens for r in done)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    config = {k: v for k, v in vars(args).items() if k not in ("api_key", "result_json", "disable_tqdm")}
    config["request_rate"] = "inf" if math.isinf(args.request_rate) else args.request_rate
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": model, "config": config,
            "completed": len(done), "failed": len(results) - len(done), "errors": errors,
            "usage_reported": sum(r.usage_reported for r in done), "duration_s": duration,
            "total_input_tokens": total_in, "total_output_tokens": total_out,
            "request_throughput": per_s(len(done)), "output_throughput": per_s(total_out),
            "total_token_throughput": per_s(total_in + total_out),
            **_stats("ttft", [r.ttft for r in done if r.output_tokens > 0]), **_stats("tpot", tpots),
            **_stats("itl", [x for r in done for x in r.itl]), **_stats("e2el", [r.e2e for r in done])}


def format_table(s: dict) -> str:
    rows = [("Successful requests:", s["completed"]), ("Failed requests:", s["failed"])]
    rows += [(f"  error {k}:", v) for k, v in sorted(s["errors"].items())]
    rows += [("Benchmark duration (s):", f"{s['duration_s']:.2f}"), ("Total input tokens:", s["total_input_tokens"]),
             ("Total generated tokens:", s["total_output_tokens"]),
             ("Request throughput (req/s):", f"{s['request_throughput']:.2f}"),
             ("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}"),
             ("Total token throughput (tok/s):", f"{s['total_token_throughput']:.2f}")]
    lines = ["{s:=^60}".format(s=" Serving Benchmark Result ")] + [f"{k:<44}{v:>16}" for k, v in rows]
    for key, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                       ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append("{s:-^60}".format(s=f" {title} "))
        for stat in ("mean", "median", "p99"):
            lines.append(f"{f'{stat.capitalize()} {key.upper()} (ms):':<44}{s[f'{stat}_{key}_ms']:>16.2f}")
    lines.append("=" * 60)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when at least one request completed; failures under load are results, not errors."""
    args = parse_args(argv)
    try:
        summary = asyncio.run(run_benchmark(args))
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        print(f"goldfinch-bench: could not start: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(format_table(summary))
    if args.result_json:
        with open(args.result_json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
