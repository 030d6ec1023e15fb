"""Overload: offer ~10x the request rate the server sustains and check it degrades gracefully.

    python benchmarks/overload.py [--duration 20] [--factor 10] [--out overload.json] [--url URL --pid PID]

1. Solo runs: greedy outputs of a fixed prompt set, one request at a time.
2. Sustainable rate: a short closed-loop run (--concurrency clients back to back) measures the
   completed requests per second.
3. Overload: Poisson arrivals at --factor times that rate for --duration seconds (at most
   --max-requests), each a greedy request from the fixed set.

Reports: accepted requests and whether each equals its solo output, 429s and whether each carries
Retry-After and OpenAI's error body, other failures by class, p50/p99 latency of rejections and of
accepted requests, server RSS before and after (/proc/<pid>/status), and whether the server
returns to idle (running = waiting = 0, cache usage 0, no state slots held) afterwards.
Without --url it starts its own server on 127.0.0.1 with a small queue bound. Loopback only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import gauges, own_server_or_url, percentile, rss_mb  # noqa: E402


def prompts(seed: int, count: int = 8) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 400) for _ in range(rng.randrange(3, 24))] for _ in range(count)]


def body(prompt: list[int], max_tokens: int) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


async def solo_outputs(client: httpx.AsyncClient, url: str, fixed: list[list[int]], max_tokens: int) -> list[str]:
    out = []
    for p in fixed:
        r = await client.post(url + "/v1/completions", json=body(p, max_tokens))
        r.raise_for_status()
        out.append(r.json()["choices"][0]["text"])
    return out


async def closed_loop(client: httpx.AsyncClient, url: str, fixed: list[list[int]], max_tokens: int,
                      concurrency: int, seconds: float) -> dict:
    """Completed requests per second with `concurrency` clients sending back to back."""
    done = Counter()
    start = time.monotonic()
    stop_at = start + seconds

    async def client_loop(i: int) -> None:
        k = i
        while time.monotonic() < stop_at:
            r = await client.post(url + "/v1/completions", json=body(fixed[k % len(fixed)], max_tokens))
            done[r.status_code] += 1
            k += 1

    await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
    elapsed = time.monotonic() - start
    return {"concurrency": concurrency, "seconds": round(elapsed, 2), "completed": done[200],
            "other": {str(k): v for k, v in done.items() if k != 200},
            "rate_per_s": done[200] / elapsed if elapsed else 0.0}


async def raw_post(host: str, port: int, path: str, payload: bytes, headers: dict) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 POST on a fresh connection (Connection: close): far lighter than a pooled client,
    so the load generator is not the bottleneck, and no keep-alive races at the server's idle timeout."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\nConnection: close\r\n{head}\r\n".encode() + payload)
        await writer.drain()
        data = await reader.read(-1)  # until the server closes
    finally:
        writer.close()
    head_bytes, _, body_bytes = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if hdrs.get("transfer-encoding") == "chunked":  # not for these JSON answers, but be safe
        out, rest = b"", body_bytes
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body_bytes = out
    return status, hdrs, body_bytes


async def open_loop(client: httpx.AsyncClient, url: str, fixed: list[list[int]], solo: list[str], max_tokens: int,
                    rate: float, seconds: float, max_requests: int, seed: int) -> dict:
    rng = random.Random(seed)
    results: list[dict] = []
    tasks = []
    parsed = httpx.URL(url)
    host, port = parsed.host, parsed.port or 80
    payloads = [json.dumps(body(p, max_tokens)).encode() for p in fixed]
    extra = {k: v for k, v in client.headers.items() if k.lower() == "authorization"}

    async def one(k: int) -> None:
        t0 = time.monotonic()
        rec = {"prompt": k % len(fixed)}
        try:
            status, hdrs, data = await raw_post(host, port, "/v1/completions", payloads[rec["prompt"]], extra)
            rec["status"] = status
            if status == 200:
                rec["correct"] = json.loads(data)["choices"][0]["text"] == solo[rec["prompt"]]
            elif status == 429:
                err = json.loads(data).get("error", {})
                retry = hdrs.get("retry-after", "")
                rec["retry_after_ok"] = retry.isdigit() and int(retry) >= 1
                rec["error_body_ok"] = err.get("type") == "rate_limit_error" and bool(err.get("message"))
        except (OSError, ValueError, IndexError) as exc:
            rec["status"] = f"exc_{type(exc).__name__}"
        rec["latency_s"] = time.monotonic() - t0
        results.append(rec)

    start = time.monotonic()
    t_next = start
    k = 0
    while k < max_requests:
        t_next += rng.expovariate(rate)
        if t_next - start > seconds:
            break
        await asyncio.sleep(max(0.0, t_next - time.monotonic()))
        tasks.append(asyncio.create_task(one(k)))
        k += 1
    offered_for = time.monotonic() - start
    await asyncio.gather(*tasks)
    return {"results": results, "offered": k, "offered_for_s": offered_for, "finished_after_s": time.monotonic() - start}


async def run_async(url: str, pid: int, duration: float = 20.0, factor: float = 10.0, closed_s: float = 8.0,
                    concurrency: int = 8, max_tokens: int = 16, max_requests: int = 5000, seed: int = 1,
                    headers: dict | None = None) -> dict:
    fixed = prompts(seed)
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=300, limits=limits, headers=headers or {}) as client:
        solo = await solo_outputs(client, url, fixed, max_tokens)
        closed = await closed_loop(client, url, fixed, max_tokens, concurrency, closed_s)
        rss_before = rss_mb(pid)
        rate = max(1.0, closed["rate_per_s"]) * factor
        loop = await open_loop(client, url, fixed, solo, max_tokens, rate, duration, max_requests, seed)
    idle_at = time.monotonic()
    m = gauges(url)
    while (m["num_requests_running"] or m["num_requests_waiting"] or m["cache_usage_perc"]
           or m["state_slots_used"]) and time.monotonic() - idle_at < 30:
        await asyncio.sleep(0.1)
        m = gauges(url)
    idle_after_s = time.monotonic() - idle_at
    rss_after = rss_mb(pid)
    results = loop["results"]
    accepted = [r for r in results if r["status"] == 200]
    rejected = [r for r in results if r["status"] == 429]
    other = Counter(str(r["status"]) for r in results if r["status"] not in (200, 429))
    health = httpx.get(url + "/health", timeout=10).status_code
    return {
        "sustainable": closed,
        "offered_rate_per_s": round(rate, 2), "factor": factor, "offered": loop["offered"],
        "offered_for_s": round(loop["offered_for_s"], 2), "all_answered_after_s": round(loop["finished_after_s"], 2),
        "accepted": len(accepted), "accepted_correct": sum(r["correct"] for r in accepted),
        "accepted_wrong": sum(not r["correct"] for r in accepted),
        "accepted_rate_per_s": round(len(accepted) / loop["finished_after_s"], 2) if loop["finished_after_s"] else 0,
        "rejected_429": len(rejected),
        "rejected_with_retry_after": sum(r["retry_after_ok"] for r in rejected),
        "rejected_with_error_body": sum(r["error_body_ok"] for r in rejected),
        "other_errors": dict(other),
        "rejection_latency_s": {"p50": percentile([r["latency_s"] for r in rejected], 0.5),
                                "p99": percentile([r["latency_s"] for r in rejected], 0.99),
                                "max": max((r["latency_s"] for r in rejected), default=None)},
        "accepted_latency_s": {"p50": percentile([r["latency_s"] for r in accepted], 0.5),
                               "p99": percentile([r["latency_s"] for r in accepted], 0.99)},
        "rss_mb": {"before": round(rss_before, 2), "after": round(rss_after, 2),
                   "growth": round(rss_after - rss_before, 2)},
        "idle_after": {k: m[k] for k in ("num_requests_running", "num_requests_waiting", "cache_usage_perc",
                                         "state_slots_used")},
        "idle_reached": not (m["num_requests_running"] or m["num_requests_waiting"] or m["cache_usage_perc"]
                             or m["state_slots_used"]),
        "idle_after_s": round(idle_after_s, 2),
        "health_after": health,
    }


def run(url: str, pid: int, **kw) -> dict:
    return asyncio.run(run_async(url, pid, **kw))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of overload")
    ap.add_argument("--factor", type=float, default=10.0, help="offered rate / sustainable rate")
    ap.add_argument("--closed-loop-s", type=float, default=8.0, help="seconds of the sustainable-rate run")
    ap.add_argument("--concurrency", type=int, default=8, help="clients of the sustainable-rate run")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-requests", type=int, default=5000, help="bound on requests offered")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--url", default=None, help="a running server (loopback); default: start one")
    ap.add_argument("--pid", type=int, default=None, help="the server's pid (with --url)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--out", default=None, help="write the report (JSON) here")
    args = ap.parse_args(argv)
    server, url, pid = own_server_or_url(args, "--max-num-seqs", "8", "--max-queue", "16", "--max-model-len", "256",
                                         "--cache-tokens", "8192")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    try:
        report = run(url, pid, duration=args.duration, factor=args.factor, closed_s=args.closed_loop_s,
                     concurrency=args.concurrency, max_tokens=args.max_tokens, max_requests=args.max_requests,
                     seed=args.seed, headers=headers)
    finally:
        if server is not None:
            server.stop()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    ok = (report["accepted_wrong"] == 0 and not report["other_errors"] and report["idle_reached"]
          and report["rejected_with_retry_after"] == report["rejected_429"] and report["health_after"] == 200)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
