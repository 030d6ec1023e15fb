"""A demo generation without the server: greedy tokens from a GoldFinch checkpoint.

    python -m engine.demo [--model DIR] [--prompt-ids 1,2,3] [--max-tokens 32] [--device cpu]

The default is the built-in demo model (models/demo); its tokenizer shows the text as well.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .loader import load_checkpoint
from .model import GoldFinchModel

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "demo"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint file or folder")
    ap.add_argument("--prompt-ids", default="1,2,3,4,5", help="comma-separated token ids")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = GoldFinchModel(load_checkpoint(args.model, dtype=dtype, device=args.device))
    cfg = model.config
    print(f"model {args.model}: {cfg.n_layer} layers ({cfg.n_finch} Finch {cfg.tmix}, {cfg.n_gold} GOLD), "
          f"width {cfg.n_embd}, vocab {cfg.vocab_size}, {dtype} on {args.device}")
    prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    t0 = time.perf_counter()
    logits, state = model.forward(torch.tensor([prompt], device=args.device))
    out = []
    for _ in range(args.max_tokens):
        token = int(logits[0].argmax())
        out.append(token)
        logits, state = model.forward(torch.tensor([[token]], device=args.device), state)
    elapsed = time.perf_counter() - t0
    print(f"prompt {prompt}\ngenerated {out}")
    tokenizer_file = Path(args.model) / "tokenizer.model"
    if tokenizer_file.is_file():
        from .tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_file)
        print(f"text: {tok.decode(prompt)!r} -> {tok.decode(out)!r}")
    print(f"{len(out)} tokens in {elapsed:.2f}s; persistent cache {state.persistent_bytes_per_token()} B/token, "
          f"RNN state {state.rnn.bytes_per_slot()} B per sequence")


if __name__ == "__main__":
    main()
