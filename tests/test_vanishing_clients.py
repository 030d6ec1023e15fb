"""Clients that vanish: 200 streamed requests (20 at a time) whose clients go away at seeded random
points (before any answer, mid-body, after k events, a non-streamed one timing out), against a
small pool that forces waiting and preemption. Afterwards nothing is running or waiting, no pool
block or state slot is held, and the undisturbed requests among them equal their solo greedy runs.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import random
import socket

import httpx
import pytest

from server_harness import ServerProcess, train_tokenizer

N_REQUESTS = 200
CONCURRENCY = 20
SEED = 7
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tok = train_tokenizer(tmp_path_factory.mktemp("tok"))
    srv = ServerProcess("--max-num-seqs", "8", "--max-queue", "512", "--max-model-len", "128", "--cache-tokens", "160",
                        "--block-size", "8", tokenizer=tok).wait_ready()
    yield srv
    srv.stop()


PROMPTS = [[(13 * i + 7 * j) % 397 + 1 for j in range(8 + 3 * i)] for i in range(6)]


def greedy(i: int, stream: bool = True) -> dict:
    return {"prompt": PROMPTS[i], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": stream}


LOST_FINAL_UPDATE = "lost-final-update"  # a stream that ended without its final update (must never happen)


def stream_text(url: str, body: dict, leave_after: int | None = None) -> str | None:
    """The streamed text, or None after leaving once `leave_after` events have come. A stream that
    ends without a finish_reason is marked (a known server bug), not returned as a normal text."""
    texts, reasons = [], []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        events = 0
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if leave_after is not None and events >= leave_after:
                return None  # the with-block closes the connection mid-stream
            events += 1
            if line == "data: [DONE]":
                break
            event = json.loads(line[6:])
            assert "error" not in event, event
            texts.extend(c["text"] for c in event["choices"])
            reasons.extend(c["finish_reason"] for c in event["choices"] if c["finish_reason"])
    if not reasons:
        return LOST_FINAL_UPDATE + ":" + "".join(texts)
    return "".join(texts)


def raw_request(port: int, payload: bytes, send_bytes: int | None = None, read_first: bool = False) -> None:
    """Sends (part of) a request on a raw socket and drops the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n").encode()
        data = head + payload
        s.sendall(data if send_bytes is None else data[:send_bytes])
        if read_first:
            s.recv(1)  # the answer has started: the generation is running
    # closed here without reading the rest (an RST if unread data is left)


def run_job(url: str, port: int, job: tuple) -> tuple:
    kind, i, arg = job
    body = greedy(i)
    if kind == "complete":
        return kind, i, stream_text(url, body)
    if kind == "leave_after_events":
        stream_text(url, {**body, "max_tokens": 96 - len(PROMPTS[i])}, leave_after=arg)
    elif kind == "close_before_answer":
        raw_request(port, json.dumps(body).encode())
    elif kind == "close_mid_body":
        payload = json.dumps(body).encode()
        raw_request(port, payload, send_bytes=arg % (len(payload) + 80))
    elif kind == "close_after_first_byte":
        raw_request(port, json.dumps(body).encode(), read_first=True)
    elif kind == "non_stream_timeout":
        try:
            httpx.post(url + "/v1/completions", json={**greedy(i, stream=False), "max_tokens": 96 - len(PROMPTS[i])},
                       timeout=arg / 1000)
        except httpx.TimeoutException:
            pass
    return kind, i, None


def jobs() -> list[tuple]:
    rng = random.Random(SEED)
    kinds = ["complete", "leave_after_events", "leave_after_events", "close_before_answer", "close_mid_body",
             "close_after_first_byte", "non_stream_timeout"]
    out = []
    for _ in range(N_REQUESTS):
        kind = rng.choice(kinds)
        arg = {"leave_after_events": rng.randrange(0, 60), "close_mid_body": rng.randrange(0, 400),
               "non_stream_timeout": rng.randrange(20, 800)}.get(kind, 0)
        out.append((kind, rng.randrange(len(PROMPTS)), arg))
    return out


def test_vanishing_clients_leak_nothing(server):
    # solo runs, not streamed: a non-streamed answer is whole even where a stream loses its end (the bug)
    solo = [httpx.post(server.url + "/v1/completions", json=greedy(i, stream=False), timeout=60).json()
            ["choices"][0]["text"] for i in range(len(PROMPTS))]
    before = server.metrics()
    work = jobs()
    with cf.ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(lambda job: run_job(server.url, server.port, job), work))
    m = server.wait_idle(timeout=60)
    assert m["goldfinch:num_requests_running"] == 0 and m["goldfinch:num_requests_waiting"] == 0
    assert m["goldfinch:cache_usage_perc"] == 0, "pool blocks leaked"
    assert m["goldfinch:state_slots_used"] == 0, "state slots leaked"
    assert m["goldfinch:num_requests_preempted"] == 0
    assert m["goldfinch:engine_alive"] == 1
    completed = [(i, text) for kind, i, text in results if kind == "complete"]
    assert len(completed) >= 20
    lost = [(i, text) for i, text in completed if text.startswith(LOST_FINAL_UPDATE + ":")]
    for i, text in lost:  # the known bug truncates a stream: what came is a prefix of the solo text
        assert solo[i].startswith(text.split(":", 1)[1]), (i, text, solo[i])
    wrong = [(i, text, solo[i]) for i, text in completed if text != solo[i] and (i, text) not in lost]
    assert not wrong, wrong[:3]
    aborted = (m["goldfinch:request_success_total{finished_reason=abort}"]
               - before.get("goldfinch:request_success_total{finished_reason=abort}", 0))
    counts = {k: sum(1 for j in work if j[0] == k) for k in {j[0] for j in work}}
    print(f"jobs {counts}; aborted in the engine: {aborted:.0f}; preemptions: "
          f"{m.get('goldfinch:num_preemptions_total', 0) - before.get('goldfinch:num_preemptions_total', 0):.0f}")
    assert aborted >= counts["leave_after_events"] * 0.5  # most leavers were still generating
    log = server.output()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
    # still serving, and serving right
    final = stream_text(server.url, greedy(0))
    assert final == solo[0]
    assert not lost, f"{len(lost)} of {len(completed)} complete streams ended without their last update"
