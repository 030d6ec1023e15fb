"""Sessions survive a restart: a server with --session-dir and --save-sessions-on-shutdown saves its
sessions on SIGTERM; a new process on the same folder restores one and its second turn equals an
uninterrupted session's, reusing the saved state (cached_tokens > 0). Corrupted, truncated or
foreign files in the folder are refused with a clear 400 and never half-loaded.
"""
from __future__ import annotations

import json
import struct
import time

import httpx
import pytest

from server_harness import ServerProcess, train_tokenizer

SID = "restart-me"
TURN1 = [(11 * j) % 390 + 3 for j in range(20)]
EXTRA = [41, 42, 43, 44]
GEN = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}


def post(srv, path, body):
    return httpx.post(srv.url + path, json=body, timeout=60)


def wait_session_idle(srv, sid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        info = httpx.get(f"{srv.url}/v1/sessions/{sid}", timeout=10).json()
        if not info["busy"] or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


def turn1(srv, sid) -> list[int]:
    assert post(srv, "/v1/sessions", {"session_id": sid}).status_code == 200
    r = post(srv, "/v1/completions", {"prompt": TURN1, "session_id": sid, "logprobs": 0,
                                      "return_tokens_as_token_ids": True, **GEN})
    assert r.status_code == 200, r.text
    ids = [int(t.split(":")[1]) for t in r.json()["choices"][0]["logprobs"]["tokens"]]
    assert wait_session_idle(srv, sid)["num_tokens"] == len(TURN1) + len(ids)
    return ids


def turn2(srv, sid, ids1) -> dict:
    r = post(srv, "/v1/completions", {"prompt": TURN1 + ids1 + EXTRA, "session_id": sid, **GEN})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def restarted(tmp_path_factory):
    """Turn 1 on server A, SIGTERM, server B on the same folder (left running for the tests)."""
    tok = train_tokenizer(tmp_path_factory.mktemp("tok"))
    folder = tmp_path_factory.mktemp("sessions")
    args = ("--session-dir", str(folder), "--save-sessions-on-shutdown", "--max-model-len", "256",
            "--cache-tokens", "4096")
    a = ServerProcess(*args, tokenizer=tok).wait_ready()
    try:
        ids1 = turn1(a, SID)
        before = httpx.get(f"{a.url}/v1/sessions/{SID}").json()
    finally:
        code = a.stop()  # SIGTERM: a graceful shutdown saves every idle session
    assert code in (0, -15), a.output()  # uvicorn re-raises SIGTERM after its graceful shutdown
    b = ServerProcess(*args, tokenizer=tok).wait_ready()
    yield b, folder, ids1, before
    b.stop()


def test_saved_on_sigterm(restarted):
    _, folder, ids1, before = restarted
    assert (folder / f"{SID}.session").is_file()
    assert not list(folder.glob("*.tmp")), "the save is atomic: no temporary file is left"
    assert before["num_tokens"] == len(TURN1) + len(ids1)


def test_restored_session_continues_like_an_uninterrupted_one(restarted):
    b, _, ids1, _ = restarted
    info = post(b, "/v1/sessions/restore", {"session_id": SID})
    assert info.status_code == 200, info.text
    assert info.json()["num_tokens"] == len(TURN1) + len(ids1) and info.json()["location"] == "host"
    resumed = turn2(b, SID, ids1)
    # uninterrupted: the same two turns on a session that never left its process
    ids_ref = turn1(b, "never-restarted")
    assert ids_ref == ids1, "turn 1 is deterministic (greedy)"
    reference = turn2(b, "never-restarted", ids1)
    fresh = post(b, "/v1/completions", {"prompt": TURN1 + ids1 + EXTRA, **GEN}).json()
    assert resumed["choices"][0]["text"] == reference["choices"][0]["text"] == fresh["choices"][0]["text"]
    cached = resumed["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == len(TURN1) + len(ids1) > 0
    assert reference["usage"]["prompt_tokens_details"]["cached_tokens"] == cached
    assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def _tensor_span(data: bytes, name: str) -> tuple[int, int]:
    """Byte range of a tensor in a safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    lo, hi = header[name]["data_offsets"]
    return 8 + n + lo, 8 + n + hi


def _corrupt(data: bytes, how: str) -> bytes:
    if how == "truncated_half":
        return data[:len(data) // 2]
    if how == "truncated_last_byte":
        return data[:-1]
    if how == "empty":
        return b""
    if how == "garbage":
        return b"\x00\xff" * 500
    if how == "header_garbled":
        return data[:8] + b"#" * 16 + data[24:]
    if how == "header_length_huge":
        return struct.pack("<Q", 2**40) + data[8:]
    if how == "token_ids_flipped":  # no longer matches the key cache's token ids
        lo, _ = _tensor_span(data, "token_ids")
        return data[:lo] + bytes([data[lo] ^ 0x01]) + data[lo + 1:]
    if how == "state_nan":
        lo, _ = _tensor_span(data, "wkv")
        return data[:lo] + b"\xff\xff\xff\xff" + data[lo + 4:]
    if how == "state_bits_flipped":  # finite values, silently different
        lo, hi = _tensor_span(data, "wkv")
        out = bytearray(data)
        for i in range(lo, hi, 4):
            out[i] ^= 0x40  # low mantissa byte of each float32
        return bytes(out)
    if how == "other_model":
        return data.replace(b'"model":"', b'"model":"x', 1)
    raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated_half", "truncated_last_byte", "empty", "garbage", "header_garbled",
                                 "header_length_huge", "token_ids_flipped", "state_nan", "other_model",
                                 "state_bits_flipped"])
def test_corrupted_session_file_is_refused_whole(restarted, how):
    b, folder, _, _ = restarted
    good = (folder / f"{SID}.session").read_bytes()
    bad_id = f"bad-{how.replace('_', '-')}"
    (folder / f"{bad_id}.session").write_bytes(_corrupt(good, how))
    r = post(b, "/v1/sessions/restore", {"session_id": bad_id})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "session_id"
    assert bad_id in err["message"] and "Traceback" not in r.text
    assert any(w in err["message"] for w in ("corrupted", "truncated", "lacks", "disagree", "differ", "non-finite",
                                             "another model", "not a GoldFinch session", "version")), err
    # nothing was half-loaded: the id is unknown, the good session is untouched, the server serves on
    assert httpx.get(f"{b.url}/v1/sessions/{bad_id}").status_code == 404
    m = b.metrics()
    assert m["goldfinch:engine_alive"] == 1
    assert httpx.get(b.url + "/health").status_code == 200
