"""The shipped demo model (models/demo): it loads with the server's loader, scores held-out text as
its training run recorded, and greedy generation gives English words.

The model was trained from scratch by tools/train_demo.py (see models/demo/MODEL_CARD.md); these
tests run it on the CPU in float32 through engine.model.GoldFinchModel, in a few seconds.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

from engine.loader import load_checkpoint
from engine.model import GoldFinchModel
from engine.tokenizer import load_tokenizer

DEMO = Path(__file__).resolve().parent.parent / "models" / "demo"
SLICE_TOLERANCE = 0.05  # nats/token between the recorded and the recomputed held-out loss
WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")


@functools.lru_cache(maxsize=None)
def demo():
    log = json.loads((DEMO / "train_log.json").read_text())
    model = GoldFinchModel(load_checkpoint(DEMO, dtype=torch.float32))
    return model, load_tokenizer(str(DEMO / "tokenizer.model")), log


@functools.lru_cache(maxsize=None)
def corpus_words() -> frozenset[str]:
    return frozenset((DEMO / "words.txt").read_text(encoding="utf-8").split())


def greedy(prompt: str, n: int) -> str:
    model, tok, _ = demo()
    logits, state = model.forward(torch.tensor([tok.encode(prompt)]))
    out = []
    for _ in range(n):
        token = int(logits[0].argmax())
        if token == tok.eos_token_id:
            break
        out.append(token)
        logits, state = model.forward(torch.tensor([[token]]), state)
    return tok.decode(out)


def test_demo_model_files_and_config():
    sizes = {p.name: p.stat().st_size for p in DEMO.iterdir() if p.is_file()}
    assert {"model.pth", "config.json", "tokenizer.model", "train_log.json", "val_slice.txt",
            "MODEL_CARD.md", "words.txt"} <= set(sizes)
    assert sum(sizes.values()) < 25 * 2**20
    on_disk = torch.load(DEMO / "model.pth", map_location="cpu", mmap=True, weights_only=True)
    assert {t.dtype for t in on_disk.values()} == {torch.bfloat16}
    model, tok, log = demo()
    cfg = model.config
    assert (cfg.tmix, cfg.use_v2, cfg.use_one_minus_w, cfg.rope) == ("x060c2", True, True, None)
    assert cfg.gold_start == cfg.n_layer * 2 // 3 and cfg.n_gold >= 1  # GOLD top third
    assert cfg.vocab_size == tok.vocab_size
    assert sum(t.numel() for t in on_disk.values()) == log["params"]


def test_held_out_loss_matches_the_training_record():
    model, tok, log = demo()
    ids = tok.encode((DEMO / "val_slice.txt").read_text(encoding="utf-8"))
    assert 100 < len(ids) <= 512 and len(ids) == log["val_slice_tokens"]
    logits, _ = model.forward(torch.tensor([ids]), all_logits=True)
    loss = float(torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(ids[1:])))
    assert abs(loss - log["val_slice_loss"]) <= SLICE_TOLERANCE, (loss, log["val_slice_loss"])
    # far better than knowing only how often each token occurs (a broken model scores >= that)
    assert loss < log["unigram_entropy_val"] - 1.5, (loss, log["unigram_entropy_val"])


def test_greedy_generation_is_english_words():
    words = corpus_words()
    for prompt in ("ROMEO:", "Juliet.\nO Romeo, Romeo!", "And God said,"):
        text = greedy(prompt, 48)
        tokens = re.findall(r"\S+", text)
        found = [w for w in WORD.findall(text)]
        known = [w for w in found if w.lower() in words]
        assert len(tokens) >= 15, (prompt, text)
        assert len(set(w.lower() for w in found)) >= 8, (prompt, text)  # not one word on a loop
        assert len(known) >= 0.9 * len(found) and len(found) >= 0.8 * len(tokens), (prompt, text)
