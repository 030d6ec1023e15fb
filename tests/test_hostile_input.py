"""Hostile input against a real server: every case gets a 4xx with OpenAI's error body naming the
field, nothing leaks a stack trace, and a long greedy stream running through the whole barrage ends
with exactly the tokens of an undisturbed run.

(tests/test_server_http.py has the plain error cases; these are the adversarial ones.)
Every case once marked as a server defect is fixed and now asserted like the rest.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time

import httpx
import pytest

from server_harness import ServerProcess, train_tokenizer

MAX_LEN = 256  # --max-model-len
MAX_BODY = 2_000_000  # --max-body-bytes: the 100k-entry maps and lists below still fit under it
VOCAB = 512  # the conformance model's vocabulary
CT = "application/json"
FILL = "\u6771"  # one token per character in the test tokenizer (see _tokens_for)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tok = train_tokenizer(tmp_path_factory.mktemp("tok"))
    srv = ServerProcess("--max-model-len", str(MAX_LEN), "--max-body-bytes", str(MAX_BODY), "--cache-tokens", "8192",
                        "--session-dir", str(tmp_path_factory.mktemp("sessions")), tokenizer=tok).wait_ready()
    yield srv
    srv.stop()


def J(d) -> bytes:
    return json.dumps(d).encode()


def cmpl(**kw) -> bytes:
    return J({"prompt": "the quick", "max_tokens": 2, **kw})


def chat(**kw) -> bytes:
    return J({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw})


def raw_cmpl(fields: str) -> bytes:
    """A completions body with raw JSON text (NaN literals, escapes json.dumps would not write)."""
    return b'{"prompt": "the quick", "max_tokens": 2, ' + fields.encode() + b"}"


def _chunks():
    yield b'{"prompt": "'
    for _ in range(MAX_BODY // 100_000 + 5):
        yield b"a" * 100_000
    yield b'"}'


# id, method, path, body, content type, expected status (or set), expected param (None: none to name)
CASES = [
    # sizes and depth
    ("oversized_body", "POST", "/v1/completions", b'{"prompt": "' + b"a" * MAX_BODY + b'"}', CT, 413, None),
    pytest.param("oversized_chunked_body", "POST", "/v1/completions", "chunks", CT, 413, None),
    ("nested_lists_100k", "POST", "/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", CT,
     400, None),
    ("nested_objects_100k", "POST", "/v1/completions",
     b'{"prompt": "x", "logit_bias": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"}", CT, 400, None),
    ("nested_lists_100k_chat", "POST", "/v1/chat/completions", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     CT, 400, None),
    ("n_huge", "POST", "/v1/completions", cmpl(n=10**9), CT, 400, "n"),
    ("n_over_server_limit", "POST", "/v1/completions", cmpl(n=17), CT, 400, "n"),
    ("n_5000_digits", "POST", "/v1/completions", raw_cmpl('"n": 1' + "0" * 5000), CT, 400, None),
    ("max_tokens_huge", "POST", "/v1/completions", cmpl(max_tokens=10**12), CT, 400, "max_tokens"),
    ("max_tokens_400_digits", "POST", "/v1/completions", cmpl(max_tokens=10**400), CT, 400, "max_tokens"),
    ("max_tokens_1e308", "POST", "/v1/completions", raw_cmpl('"max_tokens": 1e308'), CT, 400, "max_tokens"),
    ("max_completion_tokens_huge", "POST", "/v1/chat/completions", chat(max_completion_tokens=10**9), CT, 400,
     "max_tokens"),
    ("logit_bias_100k", "POST", "/v1/completions", cmpl(logit_bias={str(i): 1 for i in range(100_000)}), CT, 400,
     "logit_bias"),
    ("logit_bias_1025", "POST", "/v1/completions", cmpl(logit_bias={str(i): 1 for i in range(1025)}), CT, 400,
     "logit_bias"),
    pytest.param("logit_bias_key_5000_digits", "POST", "/v1/completions", cmpl(logit_bias={"9" * 5000: 1}), CT, 400,
                 "logit_bias"),
    pytest.param("logit_bias_key_superscript", "POST", "/v1/completions", cmpl(logit_bias={"\u00b2": 1}), CT, 400,
                 "logit_bias"),
    ("stop_100k", "POST", "/v1/completions", cmpl(stop=["x"] * 100_000), CT, 400, "stop"),
    ("stop_one_1mb", "POST", "/v1/completions", cmpl(stop="x" * 1_000_000), CT, 400, "stop"),
    ("stop_token_ids_100k", "POST", "/v1/completions", cmpl(stop_token_ids=[1] * 100_000), CT, 400, "stop_token_ids"),
    ("prompts_100k", "POST", "/v1/completions", J({"prompt": ["a"] * 100_000, "max_tokens": 2}), CT, 400, "prompt"),
    ("prompt_tokens_100k", "POST", "/v1/completions", J({"prompt": [5] * 100_000, "max_tokens": 2}), CT, 400, "prompt"),
    # encodings
    ("invalid_utf8", "POST", "/v1/completions", b'{"prompt": "ab\xff\xfe\xc3", "max_tokens": 2}', CT, 400, None),
    # raw bytes ED A0 80 (a UTF-8-encoded surrogate): json.loads decodes bytes with 'surrogatepass'
    pytest.param("surrogate_bytes_chat", "POST", "/v1/chat/completions",
                 b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}], "max_tokens": 2}', CT, 400, "messages"),
    pytest.param("lone_surrogate_prompt", "POST", "/v1/completions", raw_cmpl('"prompt": "ab\\ud800cd"'), CT, 400,
                 "prompt"),
    pytest.param("lone_surrogate_prompt_list", "POST", "/v1/completions", J({"prompt": ["ok", "\ud800"], "max_tokens": 2}),
                 CT, 400, "prompt"),
    pytest.param("lone_surrogate_stream", "POST", "/v1/completions", raw_cmpl('"prompt": "\\udfff", "stream": true'),
                 CT, 400, "prompt"),
    pytest.param("lone_surrogate_chat", "POST", "/v1/chat/completions",
                 b'{"messages": [{"role": "user", "content": "x\\ud800"}], "max_tokens": 2}', CT, 400, "messages"),
    pytest.param("lone_surrogate_tokenize", "POST", "/tokenize", b'{"prompt": "\\ud800"}', CT, 400, "prompt"),
    ("lone_surrogate_user", "POST", "/v1/completions", raw_cmpl('"user": "\\ud800"'), CT, 400, "user"),
    ("lone_surrogate_session_id", "POST", "/v1/completions", raw_cmpl('"session_id": "\\ud800"'), CT, 400,
     "session_id"),
    ("lone_surrogate_stop", "POST", "/v1/completions", raw_cmpl('"stop": "\\ud800"'), CT, {200, 400}, "stop"),
    # vocabulary
    ("token_id_eq_vocab", "POST", "/v1/completions", J({"prompt": [1, VOCAB], "max_tokens": 2}), CT, 400, "prompt"),
    ("token_id_in_second_prompt", "POST", "/v1/completions", J({"prompt": [[1], [2, VOCAB + 7]], "max_tokens": 2}),
     CT, 400, "prompt"),
    ("token_id_negative", "POST", "/v1/completions", J({"prompt": [1, -1], "max_tokens": 2}), CT, 400, "prompt"),
    ("token_id_2_31", "POST", "/v1/completions", J({"prompt": [2**31], "max_tokens": 2}), CT, 400, "prompt"),
    ("token_id_2_70", "POST", "/v1/completions", J({"prompt": [2**70], "max_tokens": 2}), CT, 400, "prompt"),
    ("detokenize_out_of_vocab", "POST", "/detokenize", J({"tokens": [1, 10**6]}), CT, 400, "tokens"),
    ("detokenize_negative", "POST", "/detokenize", J({"tokens": [-1]}), CT, 400, "tokens"),
    ("logit_bias_eq_vocab", "POST", "/v1/completions", cmpl(logit_bias={str(VOCAB): 5}), CT, 400, "logit_bias"),
    ("logit_bias_negative_id", "POST", "/v1/completions", cmpl(logit_bias={"-1": 5}), CT, 400, "logit_bias"),
    ("stop_token_ids_eq_vocab", "POST", "/v1/completions", cmpl(stop_token_ids=[VOCAB]), CT, 400, "stop_token_ids"),
    # negative numbers, NaN, infinities
    ("max_tokens_negative", "POST", "/v1/completions", cmpl(max_tokens=-1), CT, 400, "max_tokens"),
    ("n_negative", "POST", "/v1/completions", cmpl(n=-1), CT, 400, "n"),
    ("temperature_negative", "POST", "/v1/completions", cmpl(temperature=-0.5), CT, 400, "temperature"),
    ("top_p_negative", "POST", "/v1/completions", cmpl(top_p=-1), CT, 400, "top_p"),
    ("top_k_negative", "POST", "/v1/completions", cmpl(top_k=-5), CT, 400, "top_k"),
    ("min_tokens_negative", "POST", "/v1/completions", cmpl(min_tokens=-1), CT, 400, "min_tokens"),
    ("logprobs_negative", "POST", "/v1/completions", cmpl(logprobs=-1), CT, 400, "logprobs"),
    ("frequency_penalty_negative", "POST", "/v1/completions", cmpl(frequency_penalty=-3), CT, 400, "frequency_penalty"),
    ("repetition_penalty_negative", "POST", "/v1/completions", cmpl(repetition_penalty=-1), CT, 400,
     "repetition_penalty"),
    ("seed_below_int64", "POST", "/v1/completions", cmpl(seed=-(2**63) - 1), CT, 400, "seed"),
    ("temperature_nan", "POST", "/v1/completions", raw_cmpl('"temperature": NaN'), CT, 400, "temperature"),
    ("top_p_infinity", "POST", "/v1/completions", raw_cmpl('"top_p": Infinity'), CT, 400, "top_p"),
    ("presence_penalty_neg_infinity", "POST", "/v1/completions", raw_cmpl('"presence_penalty": -Infinity'), CT, 400,
     "presence_penalty"),
    ("repetition_penalty_nan", "POST", "/v1/completions", raw_cmpl('"repetition_penalty": NaN'), CT, 400,
     "repetition_penalty"),
    ("max_tokens_nan", "POST", "/v1/completions", b'{"prompt": "x", "max_tokens": NaN}', CT, 400, "max_tokens"),
    ("n_nan", "POST", "/v1/completions", raw_cmpl('"n": NaN'), CT, 400, "n"),
    ("seed_nan", "POST", "/v1/completions", raw_cmpl('"seed": NaN'), CT, 400, "seed"),
    ("logit_bias_nan", "POST", "/v1/completions", raw_cmpl('"logit_bias": {"5": NaN}'), CT, 400, "logit_bias"),
    ("chat_temperature_nan", "POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', CT, 400, "temperature"),
    # unknown fields (top level is in test_server_http.py)
    ("unknown_field_chat", "POST", "/v1/chat/completions", chat(functions_x=1), CT, 400, "functions_x"),
    ("unknown_field_nested", "POST", "/v1/completions", cmpl(stream=True, stream_options={"include_usage": True, "x": 1}),
     CT, 400, "stream_options.x"),
    ("unknown_field_content_part", "POST", "/v1/chat/completions",
     J({"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "extra": 1}]}]}), CT, 400,
     "messages.0.content"),
    ("unknown_field_tokenize", "POST", "/tokenize", J({"prompt": "x", "bogus": 1}), CT, 400, "bogus"),
    ("unknown_field_session", "POST", "/v1/sessions", J({"bogus": 1}), CT, 400, "bogus"),
    ("unknown_field_restore", "POST", "/v1/sessions/restore", J({"session_id": "x", "bogus": 1}), CT, 400, "bogus"),
    # the context limit (exactly at it: see test_prompt_exactly_at_the_context_limit)
    ("tokens_one_past_limit", "POST", "/v1/completions", J({"prompt": [5] * MAX_LEN, "max_tokens": 1}), CT, 400,
     "prompt"),
    ("tokens_plus_max_tokens_one_past", "POST", "/v1/completions", J({"prompt": [5] * (MAX_LEN - 9), "max_tokens": 10}),
     CT, 400, "prompt"),
    # empty
    ("empty_prompt_in_list", "POST", "/v1/completions", J({"prompt": ["a", ""], "max_tokens": 2}), CT, 400, "prompt"),
    ("empty_token_list_in_list", "POST", "/v1/completions", J({"prompt": [[1], []], "max_tokens": 2}), CT, 400,
     "prompt"),
    ("whitespace_prompt", "POST", "/v1/completions", J({"prompt": " ", "max_tokens": 2}), CT, 400, "prompt"),
    ("empty_messages_stream", "POST", "/v1/chat/completions", J({"messages": [], "stream": True}), CT, 400, "messages"),
    ("empty_body", "POST", "/v1/completions", b"", CT, 400, None),
    # content types
    ("content_type_text_plain", "POST", "/v1/completions", cmpl(), "text/plain", {400, 415}, None),
    ("content_type_form", "POST", "/v1/completions", b"prompt=ab&max_tokens=2", "application/x-www-form-urlencoded",
     {400, 415}, None),
    ("content_type_multipart", "POST", "/v1/completions", b"--x\r\n\r\n--x--", "multipart/form-data; boundary=x",
     {400, 415}, None),
    ("content_type_xml", "POST", "/v1/chat/completions", b"<messages/>", "application/xml", {400, 415}, None),
    ("content_type_missing", "POST", "/tokenize", b'{"prompt": "x"}', None, {200, 400, 415}, None),
    # non-object JSON
    ("body_array", "POST", "/v1/completions", b"[]", CT, 400, None),
    ("body_string", "POST", "/v1/chat/completions", b'"hello"', CT, 400, None),
    ("body_number", "POST", "/v1/completions", b"1.5", CT, 400, None),
    ("body_null", "POST", "/v1/completions", b"null", CT, 400, None),
    ("body_true", "POST", "/v1/sessions", b"true", CT, 400, None),
    ("body_array_restore", "POST", "/v1/sessions/restore", b"[1]", CT, 400, None),
    ("body_trailing_garbage", "POST", "/v1/completions", cmpl() + b" }}", CT, 400, None),
    # sessions that do not exist
    ("session_get_unknown", "GET", "/v1/sessions/no-such-session", None, None, 404, "session_id"),
    ("session_delete_unknown", "DELETE", "/v1/sessions/no-such-session", None, None, 404, "session_id"),
    ("session_save_unknown", "POST", "/v1/sessions/no-such-session/save", None, None, 404, "session_id"),
    ("session_restore_unknown", "POST", "/v1/sessions/restore", J({"session_id": "no-such-session"}), CT, 404,
     "session_id"),
    pytest.param("session_get_10k_id", "GET", "/v1/sessions/" + "a" * 10_000, None, None, {400, 404}, "session_id"),
    ("session_bad_id", "POST", "/v1/completions", cmpl(session_id="../../etc/passwd"), CT, 400, "session_id"),
    ("session_n_2", "POST", "/v1/completions", cmpl(session_id="hostile-s1", n=2), CT, 400, "n"),
]


def _values(case) -> tuple:
    return tuple(case.values) if hasattr(case, "marks") else case


KNOWN_BUGS: set[str] = set()  # cases of server defects still open (none now)


def send(server, method: str, path: str, body, content_type) -> httpx.Response:
    headers = {"content-type": content_type} if content_type else {}
    content = _chunks() if body == "chunks" else body
    return httpx.request(method, server.url + path, content=content, headers=headers, timeout=60)


def check(r: httpx.Response, status, param) -> None:
    statuses = status if isinstance(status, set) else {status}
    assert r.status_code in statuses, r.text[:500]
    assert "Traceback" not in r.text and 'File "' not in r.text
    if r.status_code == 200:
        return
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert err["type"] != "internal_server_error", err
    if param is None:
        return
    assert err["param"] is not None and (err["param"] == param or err["param"].startswith(param + ".")), err
    assert len(err["message"]) < 2000, "an error message should not echo a huge input"


@pytest.mark.parametrize("name,method,path,body,content_type,status,param", CASES,
                         ids=[_values(c)[0] for c in CASES])
def test_hostile_case(server, name, method, path, body, content_type, status, param):
    check(send(server, method, path, body, content_type), status, param)


def _tokens_for(server, n: int) -> str:
    """Chat content whose rendered prompt is exactly n tokens ('東' is one token each, never merged, in
    the test tokenizer)."""
    def count(text: str) -> int:
        r = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": text}]}, timeout=30)
        return r.json()["count"]

    base = count("")
    assert base < n
    text = FILL * (n - base)
    while count(text) < n:
        text += FILL
    while count(text) > n:
        text = text[:-1]
    assert count(text) == n
    return text


def test_prompt_exactly_at_the_context_limit(server):
    post = lambda path, body: httpx.post(server.url + path, json=body, timeout=60)  # noqa: E731
    # token ids: prompt + max_tokens == max_model_len is served; one more is refused naming prompt
    r = post("/v1/completions", {"prompt": [5] * (MAX_LEN - 1), "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["total_tokens"] == MAX_LEN
    r = post("/v1/completions", {"prompt": [5] * (MAX_LEN - 4), "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == MAX_LEN
    check(post("/v1/completions", {"prompt": [5] * (MAX_LEN - 3), "max_tokens": 4}), 400, "prompt")
    # text: the default max_tokens (16) counts too
    text = FILL * (MAX_LEN - 16)
    assert httpx.post(server.url + "/tokenize", json={"prompt": text}).json()["count"] == MAX_LEN - 16
    assert post("/v1/completions", {"prompt": text, "ignore_eos": True}).status_code == 200
    check(post("/v1/completions", {"prompt": text + FILL}), 400, "prompt")
    # chat without max_tokens gets what is left: at max_model_len - 1 one token; at max_model_len none
    content = _tokens_for(server, MAX_LEN - 1)
    r = post("/v1/chat/completions", {"messages": [{"role": "user", "content": content}], "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == MAX_LEN - 1 and r.json()["usage"]["completion_tokens"] == 1
    check(post("/v1/chat/completions", {"messages": [{"role": "user", "content": content + FILL}]}), 400, "prompt")
    check(post("/v1/chat/completions", {"messages": [{"role": "user", "content": content}], "max_tokens": 2}), 400,
          "prompt")


def _stream_text(server, body: dict) -> tuple[str, list[str]]:
    texts, reasons = [], []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event, event
                for c in event["choices"]:
                    texts.append(c["text"])
                    if c["finish_reason"]:
                        reasons.append(c["finish_reason"])
    return "".join(texts), reasons


def test_barrage_leaves_a_concurrent_stream_untouched(server):
    """All cases, three rounds, 8 at a time, while one long greedy stream runs."""
    body = {"prompt": [11, 12, 13, 14, 15, 16], "max_tokens": MAX_LEN - 6, "temperature": 0, "ignore_eos": True,
            "stream": True}
    solo, solo_reasons = _stream_text(server, body)
    assert solo_reasons == ["length"]
    result: dict = {}

    def long_stream():
        result["text"], result["reasons"] = _stream_text(server, body)
        result["done"] = time.monotonic()

    t = threading.Thread(target=long_stream)
    t.start()
    time.sleep(0.3)  # the stream is in flight
    started = time.monotonic()
    cases = [_values(c) for c in CASES] * 3
    with cf.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda c: (c, send(server, *c[1:5])), cases))
    barrage_end = time.monotonic()
    t.join(180)
    assert not t.is_alive()
    statuses = {}
    for case, r in responses:
        statuses.setdefault(case[0], set()).add(r.status_code)
        if case[0] in KNOWN_BUGS:  # a server defect still open: not a 2xx, and the server survives
            assert r.status_code >= 400
            continue
        check(r, case[5], case[6])
    assert result["done"] > started, "the stream should have run during the barrage"
    print(f"barrage: {len(responses)} requests in {barrage_end - started:.1f}s; stream finished "
          f"{result['done'] - barrage_end:+.1f}s after the barrage")
    assert server.proc.poll() is None
    assert result["text"] == solo and result["reasons"] == ["length"]
    assert server.proc.poll() is None
    assert httpx.get(server.url + "/health").status_code == 200
    m = server.wait_idle()
    assert m["goldfinch:num_requests_running"] == 0 and m["goldfinch:num_requests_waiting"] == 0
    assert m["goldfinch:state_slots_used"] == m["goldfinch:num_sessions_device"]
    assert m["goldfinch:engine_alive"] == 1
