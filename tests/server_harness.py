"""Starting real servers (uvicorn on 127.0.0.1, a free port) for the HTTP tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from conftest import CONFORMANCE_DIR, ROOT

MODEL = CONFORMANCE_DIR / "goldfinch_l6_d128"
CORPUS = ("the quick brown fox jumps over the lazy dog. " * 3
          + "to be or not to be, that is the question. whether tis nobler in the mind to suffer "
          + "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. "
          + "naïve café déjà vu — 東京 🦜 emoji and ünïcödé text keeps byte fallback honest.\n") * 20


def train_tokenizer(folder: Path) -> Path:
    """A tiny SentencePiece BPE (byte fallback) whose ids fit the conformance model's vocabulary."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tok"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   minloglevel=2, bos_id=-1, eos_id=2, unk_id=0, pad_id=-1)
    return folder / "tok.model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str, tokenizer: Path | None = None, model: Path | None = MODEL, env: dict | None = None):
        """model=None starts the server on its built-in default model (no --model)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "server", *(["--model", str(model)] if model is not None else []),
               "--port", str(self.port),
               "--host", "127.0.0.1", "--device", "cpu", "--log-level", "warning", "--cpu-threads", "1", *args]
        if tokenizer is not None:
            cmd += ["--tokenizer", str(tokenizer)]
        clean = {k: v for k, v in os.environ.items() if not k.startswith("GOLDFINCH_")}
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"goldfinch-test-server-{self.port}.log", "w+")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**clean, **(env or {})})

    def wait_ready(self, timeout: float = 120.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        if self.log.closed:
            return ""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics by name with labels, parsed by prometheus_client's own parser."""
        from prometheus_client.parser import text_string_to_metric_families

        out = {}
        for family in text_string_to_metric_families(httpx.get(self.url + "/metrics", timeout=10).text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
                out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
        return out

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if (m["goldfinch:num_requests_running"] == 0 and m["goldfinch:num_requests_waiting"] == 0
                    and m["goldfinch:cache_usage_perc"] == 0) or time.monotonic() > deadline:
                return m
            time.sleep(0.1)
