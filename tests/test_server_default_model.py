"""The server started with no --model serves the built-in demo model and answers in English."""
from __future__ import annotations

import re

import httpx
import pytest

from conftest import ROOT
from server_harness import ServerProcess

DEMO = ROOT / "models" / "demo"
pytestmark = pytest.mark.skipif(not (DEMO / "model.pth").is_file(), reason="no built-in demo model")


def test_default_server_answers_with_words_of_the_corpus():
    srv = ServerProcess("--max-model-len", "512", "--cache-tokens", "4096", model=None).wait_ready()
    try:
        assert httpx.get(srv.url + "/v1/models").json()["data"][0]["id"] == "demo"
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "Juliet.\nO Romeo, Romeo!", "max_tokens": 48,
                                                         "temperature": 0.7, "seed": 3}, timeout=120).json()
        text = r["choices"][0]["text"]
        corpus = set((DEMO / "words.txt").read_text(encoding="utf-8").split())
        words = re.findall(r"[A-Za-z']+", text)
        assert len(words) >= 8, text
        known = sum(w in corpus or w.lower() in corpus for w in words)
        assert known / len(words) >= 0.8, (text, known, len(words))
    finally:
        srv.stop()
