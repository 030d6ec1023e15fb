"""Raw HTTP against real servers: error bodies and codes, keys, queue bound, disconnects, sessions,
preemption under a tiny pool."""
from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest

from server_harness import ServerProcess, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def server(tok, tmp_path_factory):
    srv = ServerProcess("--cache-tokens", "4096", "--max-model-len", "256", "--served-model-name", "gf",
                        "--api-key", "key-a,key-b", "--max-body-bytes", "200000",
                        "--session-dir", str(tmp_path_factory.mktemp("sessions")), tokenizer=tok).wait_ready()
    yield srv
    srv.stop()


A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}


def post(server, path, body, headers=A, **kw):
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kw)


def assert_error(r: httpx.Response, status: int, param: str | None = None, type_: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if type_ is not None:
        assert err["type"] == type_, err
    assert "Traceback" not in r.text
    return err


def test_api_keys(server):
    body = {"prompt": [1, 2], "max_tokens": 1}
    assert_error(post(server, "/v1/completions", body, headers={}), 401, type_="authentication_error")
    assert_error(post(server, "/v1/completions", body, headers={"Authorization": "Bearer nope"}), 401)
    assert post(server, "/v1/completions", body, headers=B).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200  # open by default
    assert httpx.get(server.url + "/v1/models").status_code == 401


@pytest.mark.parametrize("body,param", [
    ({"prompt": [1, 2], "max_tokens": 0}, "max_tokens"),
    ({"prompt": [1, 2], "temperature": 3}, "temperature"),
    ({"prompt": [1, 2], "top_p": 0}, "top_p"),
    ({"prompt": [1, 2], "n": 1000}, "n"),
    ({"prompt": [1, 2], "bogus_field": 1}, "bogus_field"),
    ({"prompt": [1, 2], "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"prompt": [1, 2], "logit_bias": {"5": 500}}, "logit_bias"),
    ({"prompt": [1, 2], "logit_bias": {"99999": 1}}, "logit_bias"),
    ({"prompt": [1, 99999]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1, 2], "stop": ["x"] * 100}, "stop"),
    ({"prompt": [1, 2], "max_tokens": 100000}, "max_tokens"),
    ({"prompt": [1, 2], "stop_token_ids": [100000]}, "stop_token_ids"),
    ({"prompt": [1, 2], "seed": "x"}, "seed"),
])
def test_invalid_fields_are_named(server, body, param):
    assert_error(post(server, "/v1/completions", body), 400, param=param, type_="invalid_request_error")


def test_other_error_cases(server):
    assert_error(post(server, "/v1/completions", {"model": "gpt-4", "prompt": "x"}), 404, param="model")
    too_long = {"prompt": list(range(300)), "max_tokens": 1}
    assert_error(post(server, "/v1/completions", too_long), 400, param="prompt")
    assert_error(post(server, "/v1/chat/completions", {"messages": []}), 400, param="messages")
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={**A, "content-type": "application/json"})
    assert_error(r, 400)
    r = httpx.post(server.url + "/v1/completions", content=b"x" * 300_000, headers={**A, "content-type": "application/json"})
    assert_error(r, 413)
    assert_error(httpx.get(server.url + "/v1/nothing-here", headers=A), 404)


def test_disconnect_mid_stream_frees_the_request(server):
    body = {"prompt": [3, 4, 5], "max_tokens": 200, "stream": True, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=A, timeout=60) as r:
        assert r.status_code == 200
        for i, _ in enumerate(r.iter_raw()):
            if i >= 3:
                break  # leave after a few events: the connection closes with the context
    m = server.wait_idle()
    assert m["goldfinch:num_requests_running"] == 0 and m["goldfinch:num_requests_waiting"] == 0
    assert m["goldfinch:cache_usage_perc"] == 0 and m["goldfinch:state_slots_used"] == 0
    assert m["goldfinch:request_success_total{finished_reason=abort}"] >= 1


def test_session_two_turns_over_http(server):
    sid = post(server, "/v1/sessions", {}).json()["id"]
    assert sid.startswith("sess-") and len(sid) > 20  # server-generated ids are unguessable
    turn1 = [7, 8, 9, 10, 11, 12]
    r1 = post(server, "/v1/completions", {"prompt": turn1, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
                                          "session_id": sid, "logprobs": 0, "return_tokens_as_token_ids": True})
    r1 = r1.json()
    assert r1["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    ids1 = [int(t.split(":")[1]) for t in r1["choices"][0]["logprobs"]["tokens"]]
    turn2 = turn1 + ids1 + [20, 21, 22]
    r2 = post(server, "/v1/completions", {"prompt": turn2, "max_tokens": 5, "temperature": 0,
                                          "ignore_eos": True, "session_id": sid}).json()
    assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] == len(turn1) + 5  # every first-turn token
    fresh = post(server, "/v1/completions", {"prompt": turn2, "max_tokens": 5, "temperature": 0,
                                             "ignore_eos": True}).json()
    assert r2["choices"][0]["text"] == fresh["choices"][0]["text"]
    assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    info = _wait_session_idle(server, sid)
    assert info["num_tokens"] == len(turn2) + 5 and info["location"] in ("device", "host")
    # another key cannot see, extend or close it
    assert_error(httpx.get(f"{server.url}/v1/sessions/{sid}", headers=B), 404)
    assert_error(post(server, "/v1/completions", {"prompt": turn2 + [1], "session_id": sid}, headers=B), 404)
    assert_error(httpx.delete(f"{server.url}/v1/sessions/{sid}", headers=B), 404)
    assert post(server, f"/v1/sessions/{sid}/save", {}).status_code == 200
    assert httpx.delete(f"{server.url}/v1/sessions/{sid}", headers=A).json()["deleted"] is True
    assert_error(post(server, "/v1/sessions/restore", {"session_id": sid}, headers=B), 404)
    restored = post(server, "/v1/sessions/restore", {"session_id": sid}).json()
    assert restored["num_tokens"] == len(turn2) + 5 and restored["location"] == "host"
    assert_error(post(server, "/v1/sessions/restore", {"session_id": "../../etc/passwd"}), 400)


def _wait_session_idle(server, sid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        info = httpx.get(f"{server.url}/v1/sessions/{sid}", headers=A).json()
        if not info["busy"] or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


def test_queue_bound_gives_429_with_retry_after(tok):
    srv = ServerProcess("--cache-tokens", "2048", "--max-num-seqs", "1", "--max-queue", "1", tokenizer=tok).wait_ready()
    try:
        body = {"prompt": [1, 2, 3], "max_tokens": 40, "ignore_eos": True, "temperature": 0}
        with cf.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(httpx.post, srv.url + "/v1/completions", json=body, timeout=120) for _ in range(8)]
            responses = [f.result() for f in futures]
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 2 and codes.count(429) >= 1, codes
        for r in responses:
            if r.status_code == 429:
                assert_error(r, 429, type_="rate_limit_error")
                assert int(r.headers["Retry-After"]) >= 1
        assert srv.wait_idle()["goldfinch:num_requests_running"] == 0
    finally:
        srv.stop()


def test_tiny_pool_serves_concurrent_long_requests_by_preempting(tok):
    srv = ServerProcess("--cache-tokens", "96", "--block-size", "8", "--max-num-seqs", "4",
                        "--max-model-len", "96", tokenizer=tok).wait_ready()
    try:
        prompts = [[(7 * i + j) % 390 + 1 for j in range(20 + 5 * i)] for i in range(4)]

        def run(p):
            return httpx.post(srv.url + "/v1/completions", json={"prompt": p, "max_tokens": 30, "temperature": 0,
                                                                 "ignore_eos": True}, timeout=300).json()

        with cf.ThreadPoolExecutor(4) as pool:
            together = list(pool.map(run, prompts))
        m = srv.wait_idle()
        assert m["goldfinch:num_preemptions_total"] > 0
        for p, out in zip(prompts, together):
            alone = run(p)
            assert out["choices"][0]["text"] == alone["choices"][0]["text"]
            assert out["usage"]["completion_tokens"] == 30
    finally:
        srv.stop()


def test_not_ready_is_503_in_process():
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.auth import ApiKeys
    from server.state import ServerSettings, ServerState

    state = ServerState(settings=ServerSettings(served_model_name="x", max_model_len=64), keys=ApiKeys([]))
    client = TestClient(create_app(state))
    assert_error(client.get("/health"), 503, type_="service_unavailable")
    assert_error(client.post("/v1/completions", json={"prompt": "hi"}), 503)
    state.load_error = "boom"
    assert "boom" in assert_error(client.post("/v1/completions", json={"prompt": "hi"}), 503)["message"]


def test_tokenize_refuses_empty_messages(server):
    assert_error(post(server, "/tokenize", {"messages": []}), 400, param="messages")
