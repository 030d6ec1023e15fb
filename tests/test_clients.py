"""The clients against one real server: the Python client, `goldfinch-chat` and `goldfinch-bench`.

The server runs the conformance model from a folder that adds a one-line chat template. Why: the
test tokenizer (SentencePiece) folds "\\n\\n" into a space, and the server resumes a chat session
only when the decoded session tokens are a prefix of the newly rendered prompt text, which the
built-in template (blank lines between turns) can then never be. A template without newlines or
double spaces keeps decode(encode(prompt)) == prompt, so turn two's cached_tokens can be checked.
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest

from clients import bench
from clients.chat import sanitize
from clients.client import GoldFinchClient, GoldFinchError
from conftest import ROOT
from server_harness import MODEL, ServerProcess, free_port, train_tokenizer

TEMPLATE = ("{% for m in messages %}{{ m.role }}:{{ m.content }} {% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tok = train_tokenizer(tmp_path_factory.mktemp("tok"))
    model = tmp_path_factory.mktemp("model")
    for name in ("config.json", "model.pth"):
        shutil.copy(MODEL / name, model / name)
    (model / "chat_template.jinja").write_text(TEMPLATE, encoding="utf-8")
    sessions = tmp_path_factory.mktemp("sessions")
    srv = ServerProcess("--cache-tokens", "8192", "--max-model-len", "512", "--served-model-name", "gf-test",
                        "--session-dir", str(sessions), tokenizer=tok, model=model).wait_ready()
    yield srv
    log = srv.output()
    assert srv.stop() in (0, -15), log


@pytest.fixture(scope="module")
def client(server):
    with GoldFinchClient(server.url + "/v1", timeout=60) as c:  # the /v1 form must work too
        yield c


def test_health_models_tokenize_metrics(client, server):
    assert client.health() is True
    assert [m["id"] for m in client.models()] == ["gf-test"]
    ids = client.tokenize("naïve café 🦜 to be")
    assert ids and all(isinstance(i, int) for i in ids)
    assert client.detokenize(ids) == "naïve café 🦜 to be"
    m = client.metrics()
    assert m.keys() == server.metrics().keys()  # the same samples as the harness' own parser sees
    assert m["goldfinch:engine_alive"] == 1 and m["goldfinch:num_requests_running"] == 0


def test_errors(client, server):
    with pytest.raises(GoldFinchError) as e:
        client.detokenize([10**6])
    assert (e.value.status, e.value.type, e.value.param) == (400, "invalid_request_error", "tokens")
    dead = GoldFinchClient(f"http://127.0.0.1:{free_port()}", timeout=2)
    assert dead.health() is False
    with pytest.raises(GoldFinchError) as e:
        dead.models()
    assert e.value.status == 0 and e.value.type == "connection_error"


def test_session_lifecycle(client, server):
    anonymous = client.create_session()
    assert anonymous["id"] and anonymous["num_tokens"] == 0
    client.close_session(anonymous["id"])
    s = client.create_session("client-test")
    assert (s["id"], s["num_tokens"], s["location"], s["busy"]) == ("client-test", 0, "empty", False)
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    r = api.completions.create(model="gf-test", prompt=[5, 6, 7, 8], max_tokens=3, temperature=0,
                               extra_body={"session_id": "client-test", "ignore_eos": True})
    assert r.usage.completion_tokens == 3
    info = client.get_session("client-test")
    assert info["num_tokens"] == 7 and info["location"] == "device"
    assert client.save_session("client-test")["bytes"] > 0
    assert client.close_session("client-test")["deleted"] is True
    with pytest.raises(GoldFinchError) as e:
        client.get_session("client-test")
    assert (e.value.status, e.value.type, e.value.param) == (404, "not_found_error", "session_id")
    with pytest.raises(GoldFinchError) as e:
        client.close_session("never-opened")
    assert e.value.status == 404
    restored = client.restore_session("client-test")
    assert restored["num_tokens"] == 7 and restored["location"] == "host"
    client.close_session("client-test")
    assert server.metrics()["goldfinch:num_sessions"] == 0


def chat_cmd(server, *extra: str) -> list[str]:
    return [sys.executable, "-m", "clients.chat", "--url", server.url, "--temperature", "0", *extra]


def test_chat_two_turns_resume_the_session(server):
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    first = api.chat.completions.create(model="gf-test", messages=[{"role": "user", "content": "hello"}],
                                        max_tokens=8, temperature=0).choices[0].message.content
    p = subprocess.run(chat_cmd(server, "--max-tokens", "8", "--verbose"), input="hello\nand then?\n/quit\n",
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    replies = p.stdout.split("\n")
    assert sanitize(first) in p.stdout and len(replies) >= 3 and replies[-1] == ""
    usage = [dict(re.findall(r"(\w+)=(\d+)", line)) for line in p.stderr.splitlines() if "cached_tokens=" in line]
    assert len(usage) == 2, p.stderr
    assert int(usage[0]["cached_tokens"]) == 0 and int(usage[0]["completion_tokens"]) == 8
    # turn two prefilled only its new tokens: the session held turn one's prompt and reply
    assert int(usage[1]["cached_tokens"]) == int(usage[0]["prompt_tokens"]) + 8
    assert server.metrics()["goldfinch:num_sessions"] == 0  # closed at exit


def test_chat_ctrl_c_stops_a_reply_and_the_session_stays_usable(server):
    # SIGINT back to its default in the child: a suite launched in the background (`cmd &` without job
    # control) runs with SIGINT ignored, which the chat client would inherit and never see Ctrl-C
    p = subprocess.Popen(chat_cmd(server, "--max-tokens", "400"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=ROOT,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out = bytearray()
    threading.Thread(target=lambda: [out.extend(b) for b in iter(lambda: p.stdout.read1(4096), b"")],
                     daemon=True).start()
    try:
        for turn, line in enumerate((b"tell me everything\n", b"go on\n")):
            seen = len(out)
            p.stdin.write(line)
            p.stdin.flush()
            deadline = time.monotonic() + 30
            while len(out) <= seen and time.monotonic() < deadline:  # the reply has started
                time.sleep(0.02)
            p.send_signal(signal.SIGINT)
            deadline = time.monotonic() + 30
            while out.count(b"[interrupted]") <= turn and time.monotonic() < deadline:
                time.sleep(0.02)
        p.stdin.write(b"/quit\n")
        p.stdin.close()
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
    err = p.stderr.read().decode()
    assert out.count(b"[interrupted]") == 2, (bytes(out), err)
    assert "error" not in err and "Traceback" not in err, err
    server.wait_idle()
    assert server.metrics()["goldfinch:num_sessions"] == 0


def test_bench_matches_server_metrics(server, tmp_path):
    before = server.wait_idle()
    path = tmp_path / "result.json"
    rc = bench.main(["--url", server.url, "--num-prompts", "8", "--input-len", "16", "--output-len", "8",
                     "--max-concurrency", "4", "--seed", "1", "--disable-tqdm", "--result-json", str(path)])
    after = server.wait_idle()
    assert rc == 0
    r = json.loads(path.read_text())
    assert (r["completed"], r["failed"], r["errors"], r["usage_reported"]) == (8, 0, {}, 8)
    assert r["total_output_tokens"] == 8 * 8 and r["total_input_tokens"] == 8 * 16
    counters = ("goldfinch:generation_tokens_total", "goldfinch:prompt_tokens_total")
    delta = {k: after[k] - before.get(k, 0) for k in counters}
    assert delta == {"goldfinch:generation_tokens_total": r["total_output_tokens"],
                     "goldfinch:prompt_tokens_total": r["total_input_tokens"]}
    assert r["duration_s"] > 0 and r["output_throughput"] == pytest.approx(64 / r["duration_s"])
    assert 0 < r["mean_ttft_ms"] <= r["mean_e2el_ms"] and r["p99_e2el_ms"] >= r["median_e2el_ms"] > 0
    assert r["mean_tpot_ms"] > 0 and r["mean_itl_ms"] > 0
