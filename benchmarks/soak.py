"""Soak test: mixed traffic for a set time, sampling the server's memory, pool and latency.

    python benchmarks/soak.py --duration 1200 [--concurrency 6] [--out DIR] [--url URL --pid PID]

Without --url it starts a server itself on 127.0.0.1 (the conformance model and a test-trained
tokenizer, as the tests do). Traffic (seeded): completions and chat, streamed or not; greedy
requests on a fixed prompt set (streamed and not) checked against their solo outputs (a stream
must also end with its finish_reason); two-turn sessions (turn 2 must reuse turn 1's state);
clients that vanish mid-stream or time out. Every --sample-every seconds
it records the server's RSS (/proc/<pid>/status), pool usage, running/waiting, sessions and the
window's latency percentiles; every --idle-check-every seconds it pauses the traffic, waits for the
server to drain and records the idle pool (which must be empty: every session is closed after use).

Writes soak_samples.csv, soak_idle_checks.csv and soak_summary.json to --out and prints a summary
saying whether RSS and pool usage are flat after the warm-up (least-squares slope test).
Loopback only; bounded by --duration.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
GAUGES = ("num_requests_running", "num_requests_waiting", "cache_usage_perc", "state_slots_used",
          "num_sessions", "num_sessions_device", "engine_alive")


# ---- server helpers (shared by benchmarks/overload.py) ------------------------------------------
def start_server(*args: str):
    """A ServerProcess (tests/server_harness.py) with the conformance model and a test tokenizer."""
    sys.path.insert(0, str(ROOT / "tests"))
    import tempfile

    from server_harness import ServerProcess, train_tokenizer

    tok = train_tokenizer(Path(tempfile.mkdtemp(prefix="goldfinch-tok-")))
    return ServerProcess(*args, tokenizer=tok).wait_ready()


def own_server_or_url(args: argparse.Namespace, *server_args: str):
    """(server or None, url, pid): a server started here with `server_args`, or the loopback one
    given by --url and --pid."""
    if args.url is None:
        server = start_server(*server_args)
        return server, server.url, server.proc.pid
    if not args.url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        raise SystemExit("--url: loopback only")
    if args.pid is None:
        raise SystemExit("--pid: needed with --url (the server's RSS is read from /proc)")
    return None, args.url.rstrip("/"), args.pid


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def gauges(url: str, timeout: float = 10.0) -> dict[str, float]:
    """The goldfinch: gauges and counters of /metrics (labels other than the model joined in)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=timeout).text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            name = s.name.removeprefix("goldfinch:")
            out[name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def wait_idle(url: str, timeout: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = gauges(url)
        if (m["num_requests_running"] == 0 and m["num_requests_waiting"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 for fewer than two points)."""
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


UNICODE_LINE_BREAKS = ("\u0085", "\u2028", "\u2029")
sse_stats: Counter = Counter()


def sse_events(response: httpx.Response):
    """JSON payloads of an SSE stream (until [DONE]). Lines end at CR/LF only, as the SSE spec says:
    httpx's iter_lines() also splits at U+0085/U+2028/U+2029 (str.splitlines), which the server
    sends raw inside JSON strings; such events are counted in `sse_stats`."""
    buffer = b""
    for chunk in response.iter_bytes():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8")
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                return
            if any(c in data for c in UNICODE_LINE_BREAKS):
                sse_stats["events_with_unicode_line_breaks"] += 1
            yield json.loads(data)


# ---- traffic -------------------------------------------------------------------------------------
class Traffic:
    def __init__(self, url: str, seed: int, max_tokens: int, headers: dict | None = None) -> None:
        self.url, self.seed, self.max_tokens = url, seed, max_tokens
        self.headers = headers or {}
        rng = random.Random(seed)
        self.fixed_prompts = [[rng.randrange(1, 400) for _ in range(rng.randrange(4, 40))] for _ in range(8)]
        self.reference: dict[int, str] = {}
        self.lock = threading.Lock()
        self.records: list[tuple[float, str, float, str]] = []  # (end time, op, latency s, outcome)
        self.outcomes: Counter = Counter()
        self.active = 0
        self.pause = threading.Event()
        self.stop = threading.Event()

    def greedy_body(self, i: int) -> dict:
        return {"prompt": self.fixed_prompts[i], "max_tokens": self.max_tokens, "temperature": 0,
                "ignore_eos": True}

    def compute_reference(self) -> None:
        with httpx.Client(timeout=120, headers=self.headers) as c:
            for i in range(len(self.fixed_prompts)):
                r = c.post(self.url + "/v1/completions", json=self.greedy_body(i))
                r.raise_for_status()
                self.reference[i] = r.json()["choices"][0]["text"]

    # each op returns an outcome string: "ok", "aborted" (disconnects on purpose) or an error class
    def op_greedy(self, c: httpx.Client, rng: random.Random) -> str:
        i = rng.randrange(len(self.fixed_prompts))
        r = c.post(self.url + "/v1/completions", json=self.greedy_body(i))
        if r.status_code != 200:
            return f"http_{r.status_code}"
        return "ok" if r.json()["choices"][0]["text"] == self.reference[i] else "greedy_mismatch"

    def op_greedy_stream(self, c: httpx.Client, rng: random.Random) -> str:
        """Streamed: the deltas must add up to the solo text and end with a finish_reason."""
        i = rng.randrange(len(self.fixed_prompts))
        with c.stream("POST", self.url + "/v1/completions", json={**self.greedy_body(i), "stream": True}) as r:
            if r.status_code != 200:
                r.read()
                return f"http_{r.status_code}"
            events = list(sse_events(r))
        if any("error" in e for e in events):
            return "stream_error_event"
        text = "".join(ch["text"] for e in events for ch in e["choices"])
        reasons = [ch["finish_reason"] for e in events for ch in e["choices"] if ch.get("finish_reason")]
        if reasons != ["length"]:
            return "stream_without_finish"  # the stream lost its last update
        return "ok" if text == self.reference[i] else "greedy_mismatch"

    def op_completion(self, c: httpx.Client, rng: random.Random, stream: bool) -> str:
        body = {"prompt": " ".join(rng.choice(("the", "quick", "fox", "to be", "café", "東京")) for _ in
                                   range(rng.randrange(1, 30))),
                "max_tokens": rng.randrange(1, self.max_tokens + 1), "temperature": rng.choice((0, 0.7, 1.0)),
                "n": rng.choice((1, 1, 1, 2)), "stream": stream}
        return self._run(c, "/v1/completions", body, stream)

    def op_chat(self, c: httpx.Client, rng: random.Random, stream: bool) -> str:
        body = {"messages": [{"role": "system", "content": "be brief"},
                             {"role": "user", "content": "tell me about " + rng.choice(("foxes", "dogs", "tea"))}],
                "max_tokens": rng.randrange(1, self.max_tokens + 1), "temperature": 0.8, "stream": stream,
                "stream_options": {"include_usage": True} if stream else None}
        return self._run(c, "/v1/chat/completions", body, stream)

    def _run(self, c: httpx.Client, path: str, body: dict, stream: bool) -> str:
        if not stream:
            r = c.post(self.url + path, json=body)
            return "ok" if r.status_code == 200 and r.json().get("choices") else f"http_{r.status_code}"
        with c.stream("POST", self.url + path, json=body) as r:
            if r.status_code != 200:
                r.read()
                return f"http_{r.status_code}"
            events = list(sse_events(r))
        if any("error" in e for e in events):
            return "stream_error_event"
        return "ok" if events else "empty_stream"

    def op_session(self, c: httpx.Client, rng: random.Random) -> str:
        r = c.post(self.url + "/v1/sessions", json={})
        if r.status_code != 200:
            return f"http_{r.status_code}"
        sid = r.json()["id"]
        try:
            turn1 = [rng.randrange(1, 400) for _ in range(rng.randrange(4, 30))]
            r1 = c.post(self.url + "/v1/completions", json={
                "prompt": turn1, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "session_id": sid,
                "logprobs": 0, "return_tokens_as_token_ids": True})
            if r1.status_code != 200:
                return f"http_{r1.status_code}"
            ids = [int(t.split(":")[1]) for t in r1.json()["choices"][0]["logprobs"]["tokens"]]
            turn2 = turn1 + ids + [rng.randrange(1, 400) for _ in range(3)]
            for _ in range(50):  # the session takes turn 1's last token one step after it finished
                r2 = c.post(self.url + "/v1/completions", json={
                    "prompt": turn2, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "session_id": sid})
                if r2.status_code != 409:
                    break
                time.sleep(0.02)
            if r2.status_code != 200:
                return f"http_{r2.status_code}"
            return "ok" if r2.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0 else "session_no_reuse"
        finally:
            for _ in range(50):
                d = c.delete(f"{self.url}/v1/sessions/{sid}")
                if d.status_code != 409:
                    break
                time.sleep(0.02)

    def op_disconnect(self, c: httpx.Client, rng: random.Random) -> str:
        body = {"prompt": [rng.randrange(1, 400) for _ in range(10)], "max_tokens": self.max_tokens * 4,
                "ignore_eos": True, "stream": True}
        leave_after = rng.randrange(0, 6)
        with c.stream("POST", self.url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                return f"http_{r.status_code}"
            for i, _ in enumerate(r.iter_raw()):
                if i >= leave_after:
                    break
        return "aborted"

    def op_timeout(self, rng: random.Random) -> str:
        """A non-streamed request whose client gives up before it finishes."""
        body = {"prompt": [rng.randrange(1, 400) for _ in range(10)], "max_tokens": self.max_tokens * 4,
                "ignore_eos": True}
        try:
            httpx.post(self.url + "/v1/completions", json=body, timeout=rng.uniform(0.05, 0.3), headers=self.headers)
        except httpx.TimeoutException:
            return "aborted"
        return "aborted"  # it finished in time: fine too

    def worker(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        ops = [("greedy", 3), ("greedy_stream", 2), ("completion", 2), ("completion_stream", 2), ("chat", 1), ("chat_stream", 2),
               ("session", 2), ("disconnect", 1), ("timeout", 1)]
        names, weights = zip(*ops)
        with httpx.Client(timeout=120, headers=self.headers) as c:
            while not self.stop.is_set():
                if self.pause.is_set():
                    time.sleep(0.05)
                    continue
                with self.lock:
                    self.active += 1
                name = rng.choices(names, weights)[0]
                t0 = time.monotonic()
                try:
                    if name == "greedy":
                        outcome = self.op_greedy(c, rng)
                    elif name == "greedy_stream":
                        outcome = self.op_greedy_stream(c, rng)
                    elif name.startswith("completion"):
                        outcome = self.op_completion(c, rng, name.endswith("stream"))
                    elif name.startswith("chat"):
                        outcome = self.op_chat(c, rng, name.endswith("stream"))
                    elif name == "session":
                        outcome = self.op_session(c, rng)
                    elif name == "disconnect":
                        outcome = self.op_disconnect(c, rng)
                    else:
                        outcome = self.op_timeout(rng)
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    outcome = f"exc_{type(exc).__name__}"
                t1 = time.monotonic()
                with self.lock:
                    self.active -= 1
                    self.records.append((t1, name, t1 - t0, outcome))
                    self.outcomes[f"{name}:{outcome}"] += 1
                time.sleep(rng.uniform(0, 0.05))


# ---- the run -------------------------------------------------------------------------------------
def run(url: str, pid: int, duration: float, concurrency: int, sample_every: float, idle_every: float,
        warmup: float, max_tokens: int, seed: int, out: Path, headers: dict | None = None,
        log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    traffic = Traffic(url, seed, max_tokens, headers)
    traffic.compute_reference()
    rss0 = rss_mb(pid)
    threads = [threading.Thread(target=traffic.worker, args=(i,), daemon=True) for i in range(concurrency)]
    t_start = time.monotonic()
    for t in threads:
        t.start()
    samples: list[dict] = []
    idle_checks: list[dict] = []
    last_idle = t_start
    next_sample = t_start + sample_every
    consumed = 0
    try:
        while time.monotonic() - t_start < duration:
            time.sleep(max(0.0, next_sample - time.monotonic()))
            next_sample += sample_every
            now = time.monotonic()
            with traffic.lock:
                window = traffic.records[consumed:]
                consumed = len(traffic.records)
            lat = [r[2] for r in window if r[3] == "ok"]
            m = gauges(url)
            row = {"t_s": round(now - t_start, 2), "rss_mb": round(rss_mb(pid), 2),
                   **{k: m[k] for k in GAUGES}, "requests": len(window),
                   "ok": sum(r[3] == "ok" for r in window), "aborted": sum(r[3] == "aborted" for r in window),
                   "errors": sum(r[3] not in ("ok", "aborted") for r in window),
                   "p50_s": percentile(lat, 0.5), "p99_s": percentile(lat, 0.99)}
            samples.append(row)
            if now - last_idle >= idle_every:
                idle_checks.append(idle_check(url, pid, traffic, t_start))
                last_idle = time.monotonic()
                log(f"[{row['t_s']:7.0f}s] idle check: {idle_checks[-1]}")
            elif len(samples) % max(1, int(60 / sample_every)) == 0:
                log(f"[{row['t_s']:7.0f}s] rss {row['rss_mb']:.1f} MB, running {row['num_requests_running']:.0f}, "
                    f"pool {row['cache_usage_perc']:.4f}, {row['requests']} req (p99 {row['p99_s']})")
    finally:
        traffic.stop.set()
        for t in threads:
            t.join(150)
    idle_checks.append(idle_check(url, pid, traffic, t_start))
    summary = summarize(samples, idle_checks, traffic, warmup, rss0, duration, concurrency)
    write_csv(out / "soak_samples.csv", samples)
    write_csv(out / "soak_idle_checks.csv", idle_checks)
    (out / "soak_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def idle_check(url: str, pid: int, traffic: Traffic, t_start: float) -> dict:
    """Pauses the traffic, waits for the server to drain, records the idle pool."""
    traffic.pause.set()
    try:
        deadline = time.monotonic() + 150
        while traffic.active and time.monotonic() < deadline:
            time.sleep(0.05)
        m = wait_idle(url)
        deadline = time.monotonic() + 10  # closed sessions and aborts settle within a step or two
        while (m["cache_usage_perc"] or m["state_slots_used"] or m["num_sessions"]) and time.monotonic() < deadline:
            time.sleep(0.1)
            m = gauges(url)
        return {"t_s": round(time.monotonic() - t_start, 2), "rss_mb": round(rss_mb(pid), 2),
                **{k: m[k] for k in GAUGES}}
    finally:
        traffic.pause.clear()


def summarize(samples, idle_checks, traffic: Traffic, warmup: float, rss0: float, duration: float,
              concurrency: int) -> dict:
    steady = [s for s in samples if s["t_s"] >= warmup] or samples
    xs_min = [s["t_s"] / 60 for s in steady]
    rss = [s["rss_mb"] for s in steady]
    pool = [s["cache_usage_perc"] for s in steady]
    span_min = (xs_min[-1] - xs_min[0]) if len(xs_min) > 1 else 0.0
    rss_slope = slope(xs_min, rss)  # MiB per minute
    pool_slope = slope(xs_min, pool)  # fraction per minute
    rss_growth = rss_slope * span_min
    rss_flat = abs(rss_growth) <= max(8.0, 0.03 * statistics.fmean(rss)) if rss else False
    pool_flat = abs(pool_slope * span_min) <= 0.05
    idle_leaks = [c for c in idle_checks if c["cache_usage_perc"] or c["state_slots_used"] or c["num_sessions"]
                  or c["num_requests_running"] or c["num_requests_waiting"]]
    lat = [r[2] for r in traffic.records if r[3] == "ok"]
    errors = Counter(o for o in (r[3] for r in traffic.records) if o not in ("ok", "aborted"))
    return {
        "duration_s": duration, "concurrency": concurrency, "warmup_s": warmup,
        "requests": len(traffic.records), "ok": sum(r[3] == "ok" for r in traffic.records),
        "aborted_on_purpose": sum(r[3] == "aborted" for r in traffic.records),
        "errors_by_class": dict(errors), "outcomes": dict(sorted(traffic.outcomes.items())),
        "latency_ok_s": {"p50": percentile(lat, 0.5), "p90": percentile(lat, 0.9), "p99": percentile(lat, 0.99)},
        "rss_mb": {"before_traffic": round(rss0, 2), "first_steady": rss[0] if rss else None,
                   "last": rss[-1] if rss else None, "max": max(rss) if rss else None,
                   "slope_mb_per_min": round(rss_slope, 4), "growth_over_steady_mb": round(rss_growth, 2),
                   "flat": rss_flat},
        "pool_usage": {"mean_under_load": statistics.fmean(pool) if pool else None,
                       "slope_per_min": pool_slope, "flat": pool_flat},
        "sse_events_with_unicode_line_breaks": sse_stats["events_with_unicode_line_breaks"],
        "idle_checks": len(idle_checks), "idle_checks_with_leftovers": idle_leaks,
        "samples": len(samples),
        "verdict": "flat" if rss_flat and pool_flat and not idle_leaks and not errors else "NOT flat or errors",
    }


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=1200, help="seconds of traffic")
    ap.add_argument("--concurrency", type=int, default=6, help="client threads")
    ap.add_argument("--sample-every", type=float, default=5.0)
    ap.add_argument("--idle-check-every", type=float, default=120.0)
    ap.add_argument("--warmup", type=float, default=None, help="seconds left out of the slope test "
                                                              "(default: 10%% of --duration, at least 30)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--url", default=None, help="a running server (loopback); default: start one")
    ap.add_argument("--pid", type=int, default=None, help="the server's pid (with --url), for its RSS")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--out", default=os.environ.get("OUT", "soak-results"))
    args = ap.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else max(30.0, 0.1 * args.duration)
    server, url, pid = own_server_or_url(args, "--max-model-len", "256", "--max-tokens-limit", "256",
                                         "--cache-tokens", "8192", "--max-num-seqs", "32")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    try:
        print(f"soak: {args.duration:.0f}s against {url} (pid {pid}), {args.concurrency} clients, "
              f"warm-up {warmup:.0f}s", flush=True)
        summary = run(url, pid, args.duration, args.concurrency, args.sample_every, args.idle_check_every, warmup,
                      args.max_tokens, args.seed, Path(args.out), headers,
                      log=lambda s: print(s, flush=True))
        alive = httpx.get(url + "/health", timeout=10).status_code == 200
        summary["health_after"] = alive
        (Path(args.out) / "soak_summary.json").write_text(json.dumps(summary, indent=2))
    finally:
        if server is not None:
            summary_rc = server.stop()
            print(f"server exit code {summary_rc}")
    print(json.dumps(summary, indent=2))
    return 0 if summary["verdict"] == "flat" and summary["health_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
