"""A few seconds of benchmarks/overload.py: ~10x the sustainable request rate against a real server.

The server must shed the excess quickly with 429 + Retry-After + OpenAI's error body, serve what it
accepts correctly (greedy outputs equal to solo runs), raise no other error, and return to idle with
nothing held (no running or waiting requests, empty pool, no state slots).
"""
from __future__ import annotations

import sys

import httpx
import pytest

from conftest import ROOT
from server_harness import ServerProcess, train_tokenizer

sys.path.insert(0, str(ROOT / "benchmarks"))
import overload  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tok = train_tokenizer(tmp_path_factory.mktemp("tok"))
    srv = ServerProcess("--max-num-seqs", "4", "--max-queue", "8", "--max-model-len", "128", "--cache-tokens", "4096",
                        tokenizer=tok).wait_ready()
    yield srv
    srv.stop()


def test_overload_sheds_excess_and_recovers(server):
    report = overload.run(server.url, server.proc.pid, duration=5.0, factor=10.0, closed_s=3.0, concurrency=4,
                          max_tokens=8, max_requests=2000, seed=3)
    print({k: v for k, v in report.items() if k != "sustainable"}, report["sustainable"])
    sustainable = report["sustainable"]["rate_per_s"]
    assert sustainable > 0 and not report["sustainable"]["other"]
    # the offered rate really was ~10x (the load generator kept up) and the excess was shed
    assert report["offered"] >= 5 * sustainable * 5.0 * 0.5, report
    assert report["rejected_429"] > 0, report
    assert report["rejected_with_retry_after"] == report["rejected_429"]
    assert report["rejected_with_error_body"] == report["rejected_429"]
    # what was accepted was served, and served right
    assert report["accepted"] > 0
    assert report["accepted_wrong"] == 0 and report["accepted_correct"] == report["accepted"]
    assert report["other_errors"] == {}, report["other_errors"]
    assert report["accepted"] + report["rejected_429"] == report["offered"]
    # a rejection is cheap: it never waits behind generation (generous: 2 busy cores in CI)
    assert report["rejection_latency_s"]["p50"] < report["accepted_latency_s"]["p50"], report
    # bounded, not tight: at 10x load on 2 shared cores the load generator, the HTTP loop and the
    # engine compete for the CPU, and 429s wait in the socket backlog (benchmarks/overload.py reports it)
    assert report["rejection_latency_s"]["p99"] < 5.0, report["rejection_latency_s"]
    # back to idle, nothing held, memory bounded
    assert report["idle_reached"], report["idle_after"]
    assert report["health_after"] == 200
    assert report["rss_mb"]["growth"] < 100, report["rss_mb"]
    assert server.proc.poll() is None
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200
