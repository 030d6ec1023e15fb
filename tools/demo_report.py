"""The end of a demo training run: held-out slice, checks through the serving model, log and plot.

Everything here reads the checkpoint that was written (bf16, reference names) back through the
server's own loader and model on the CPU in float32, as tests/test_demo_model.py does, so the numbers
recorded are the ones the test will see.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch

SLICE_TOKENS = 480  # the held-out slice stays under 512 tokens: the CPU test runs it in a second
SLICE_SOURCE = "shakespeare/macbeth.txt"
SAMPLE_PROMPTS = ("ROMEO:", "Romeo.\n", "Juliet.\nO Romeo, Romeo!", "And God said,")
SAMPLE_TOKENS = 64


def write_words(out: Path, train_docs: list[tuple[str, str]]) -> int:
    """words.txt: every word of the training texts, lower-cased, one a line (for the generation test)."""
    words = sorted({w.lower() for _, text in train_docs for w in re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)*", text)})
    (out / "words.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    return len(words)


def pick_val_slice(val_docs: list[tuple[str, str]], tokenizer, max_tokens: int = SLICE_TOKENS) -> tuple[str, str]:
    """(source, text): whole lines of a held-out play from its second scene on (the first act's
    dialogue), as many as fit in `max_tokens`."""
    docs = dict(val_docs)
    plays = [n for n, _ in val_docs if n.startswith("shakespeare")]
    name = SLICE_SOURCE if SLICE_SOURCE in docs else (plays or [val_docs[0][0]])[0]
    text = docs[name]
    start = max(text.find("SCENE II."), text.find("ACT I."))
    out = ""
    for line in text[max(start, 0):].splitlines(keepends=True):
        if len(tokenizer.encode(out + line)) > max_tokens:
            break
        out += line
    return name, out


def slice_loss(model, tokenizer, text: str) -> tuple[float, int]:
    """Mean next-token loss (nats) of `text` through the serving model's full forward."""
    ids = tokenizer.encode(text)
    logits, _ = model.forward(torch.tensor([ids]), all_logits=True)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), torch.tensor(ids[1:]))
    return float(loss), len(ids)


def greedy(model, tokenizer, prompt: str, n: int = SAMPLE_TOKENS) -> str:
    ids = tokenizer.encode(prompt)
    logits, state = model.forward(torch.tensor([ids]))
    out = []
    for _ in range(n):
        token = int(logits[0].argmax())
        if token == tokenizer.eos_token_id:
            break
        out.append(token)
        logits, state = model.forward(torch.tensor([[token]]), state)
    return tokenizer.decode(out)


@torch.no_grad()
def saved_val_loss(out: Path, cfg, val_windows: torch.Tensor, batch: int) -> float:
    """The whole validation set through the saved bf16 weights in float32 (training forward)."""
    from engine.loader import load_checkpoint
    from tools import train_forward as TF

    dev = val_windows.device
    params = load_checkpoint(out, dtype=torch.float32, device=dev).weights
    total = 0.0
    for chunk in val_windows.split(batch):
        total += float(TF.loss_fn(params, cfg, chunk)) * len(chunk)
    return total / len(val_windows)


def plot(out: Path, log: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no loss.png")
        return
    steps, losses = zip(*log["train_loss"])
    k = max(1, len(losses) // 100)
    smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(steps, losses, color="tab:blue", alpha=0.2, lw=0.6)
    ax.plot(steps, smooth, color="tab:blue", lw=1.4, label="train (per step, smoothed)")
    if log["val_loss"]:
        vs, vl = zip(*log["val_loss"])
        ax.plot(vs, vl, "o-", color="tab:orange", ms=3, label="validation (held-out texts)")
    ax.axhline(log["unigram_entropy_val"], color="gray", ls="--", lw=1,
               label=f"unigram entropy of val tokens ({log['unigram_entropy_val']:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_ylim(min(min(losses), min(vl) if log["val_loss"] else 9) - 0.2, log["unigram_entropy_val"] + 1.5)
    ax.set_title(f"GoldFinch demo: {log['params'] / 1e6:.1f}M params, {log['tokens_seen'] / 1e6:.0f}M tokens, "
                 f"{log['card']}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png")
    plt.close(fig)


def finish(out: Path, log: dict, train_docs: list[tuple[str, str]], val_docs: list[tuple[str, str]],
           t_start: float, trainer=None) -> None:
    from engine.loader import load_checkpoint
    from engine.model import GoldFinchModel
    from engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(out / "tokenizer.model")
    log["corpus_words"] = write_words(out, train_docs)
    log["val_slice_source"], text = pick_val_slice(val_docs, tokenizer)
    (out / "val_slice.txt").write_text(text, encoding="utf-8")
    if trainer is not None:
        log["val_loss_saved_fp32"] = saved_val_loss(out, trainer.cfg, trainer.val_windows, trainer.args.batch_size)
    model = GoldFinchModel(load_checkpoint(out, dtype=torch.float32))
    log["val_slice_loss"], log["val_slice_tokens"] = slice_loss(model, tokenizer, text)
    log["samples"] = {p: greedy(model, tokenizer, p) for p in SAMPLE_PROMPTS}
    log["wall_s"] = time.time() - t_start
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    plot(out, log)
    print(json.dumps({k: v for k, v in log.items() if k not in ("train_loss", "val_loss", "args")}, indent=1))
