"""The real server driven by the official `openai` package (and raw HTTP where the package hides it)."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from server_harness import ServerProcess, train_tokenizer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tok = train_tokenizer(tmp_path_factory.mktemp("tok"))
    srv = ServerProcess("--cache-tokens", "8192", "--max-model-len", "512", "--served-model-name", "gf-test",
                        tokenizer=tok).wait_ready()
    yield srv
    log = srv.output()
    assert srv.stop() in (0, -15), log  # uvicorn re-raises SIGTERM after its graceful shutdown


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["gf-test"]


def test_completion_and_usage(client):
    r = client.completions.create(model="gf-test", prompt="to be or not", max_tokens=7, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens <= 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_greedy_is_deterministic_and_streaming_matches(client):
    kw = dict(model="gf-test", prompt="the quick brown", max_tokens=12, temperature=0, ignore_eos=True)
    a = client.completions.create(**{k: v for k, v in kw.items() if k != "ignore_eos"},
                                  extra_body={"ignore_eos": True})
    b = client.completions.create(model="gf-test", prompt="the quick brown", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert a.choices[0].text == b.choices[0].text
    chunks = list(client.completions.create(model="gf-test", prompt="the quick brown", max_tokens=12,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == a.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_seed_reproducibility(client):
    kw = dict(model="gf-test", prompt="whether tis nobler", max_tokens=10, temperature=1.0, top_p=0.9)
    a = client.completions.create(seed=42, **kw).choices[0].text
    b = client.completions.create(seed=42, **kw).choices[0].text
    c = client.completions.create(seed=7, **kw).choices[0].text
    assert a == b
    assert a != c  # 10 tokens at temperature 1 from different seeds: a collision is vanishingly unlikely


def test_n_samples(client):
    r = client.completions.create(model="gf-test", prompt=["to be", "the lazy"], n=3, max_tokens=5,
                                  temperature=1.0, seed=3)
    assert sorted(c.index for c in r.choices) == list(range(6))
    assert len({c.text for c in r.choices[:3]}) > 1


def test_stop_string_excluded(client):
    base = client.completions.create(model="gf-test", prompt="the slings and", max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(base) > 4
    stop = base[2:4]
    r = client.completions.create(model="gf-test", prompt="the slings and", max_tokens=16, temperature=0,
                                  stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[: base.index(stop)]


def test_logprobs(client):
    r = client.completions.create(model="gf-test", prompt="to be", max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and len(top) <= 3 and max(top.values()) == pytest.approx(chosen, abs=1e-5)  # greedy


def test_chat_and_chat_stream(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "to be or not to be?"}]
    r = client.chat.completions.create(model="gf-test", messages=msgs, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=2)
    assert r.choices[0].message.role == "assistant"
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
    stream = list(client.chat.completions.create(model="gf-test", messages=msgs, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == r.choices[0].message.content
    finals = [c for c in stream if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == r.choices[0].finish_reason
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == r.usage.completion_tokens


def test_sse_framing_byte_for_byte(server):
    body = {"model": "gf-test", "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_bytes())
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    payloads = [json.loads(e[len(b"data: "):]) for e in events[:-2]]
    assert all(e.startswith(b"data: {") and b"\n" not in e for e in events[:-2])
    assert [p["choices"][0]["finish_reason"] for p in payloads[:-1]][-1] == "length"
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 3


def test_tokenize_detokenize(server):
    t = httpx.post(server.url + "/tokenize", json={"prompt": "naïve café 🦜"}).json()
    assert t["count"] == len(t["tokens"]) > 0
    d = httpx.post(server.url + "/detokenize", json={"tokens": t["tokens"]}).json()
    assert d["prompt"] == "naïve café 🦜"


def test_metrics_move_by_exact_token_counts(server, client):
    before = server.wait_idle()
    r = client.completions.create(model="gf-test", prompt=[1, 2, 3, 4, 5], max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    after = server.wait_idle()
    assert r.usage.completion_tokens == 6
    assert after["goldfinch:prompt_tokens_total"] - before["goldfinch:prompt_tokens_total"] == 5
    assert after["goldfinch:generation_tokens_total"] - before["goldfinch:generation_tokens_total"] == 6
    key = "goldfinch:request_success_total{finished_reason=length}"
    assert after[key] - before.get(key, 0) == 1
    assert after["goldfinch:e2e_request_latency_seconds_count"] - before["goldfinch:e2e_request_latency_seconds_count"] == 1
    assert after["goldfinch:cache_bytes_per_token"] == 8 * 4 + 4  # fp32 compressed keys + int32 id on the CPU
    # the prompt's step samples the first token; the other five come from static decode steps over
    # the working set the prompt's step built, which is released when the request ends
    assert after["goldfinch:decode_graph_steps_total"] - before["goldfinch:decode_graph_steps_total"] == 5
    # each launched before the previous step's token was read back (engine.overlap)
    assert after["goldfinch:decode_overlapped_steps_total"] - before["goldfinch:decode_overlapped_steps_total"] == 5
    assert after["goldfinch:kv_working_sets"] == 0 and after["goldfinch:kv_working_set_usage_perc"] == 0
    assert after["goldfinch:kv_working_set_total_bytes"] > 0


def test_sse_events_never_contain_characters_that_readers_take_for_line_ends():
    from server.routes_openai import sse

    text = "a\x85b\u2028c\u2029d\x0be\x0cf\x1cg\x1dh\x1ei\nj\rk"
    raw = sse({"t": text})
    body = raw.decode()
    assert body.endswith("\n\n") and body.count("\n") == 2 and "\r" not in body
    assert len(body[:-2].splitlines()) == 1  # what str.splitlines / httpx.iter_lines would see
    assert json.loads(body[len("data: "):-2]) == {"t": text}
