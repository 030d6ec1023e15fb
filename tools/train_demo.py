"""Trains the demo GoldFinch from scratch on a folder of public-domain text (see tools/demo_data.py).

    python tools/demo_data.py prepare --out .traindata --kjv          # needs the network
    python tools/train_demo.py --data-dir .traindata --out models/demo  # CPU: add --tiny
    python3 tools/train_demo.py --data-dir .traindata --out $OUT --max-steps 700   # the shipped model

Trains a SentencePiece BPE tokenizer on the training split, then a Finch-C2 + GOLD model with the
training forward of tools/train_forward.py (the serving arithmetic), AdamW, warmup + cosine, a fixed
seed, and a number of steps given by `--max-steps` or, without it, set by the wall clock: after a few
timed steps the schedule is fixed to fill `--time-budget-s` (which also caps a `--max-steps` run).
Keeps the weights of the best validation loss (early stopping) and writes model.pth (bf16, reference
key names), config.json, tokenizer.model, val_slice.txt, words.txt, train_log.json and loss.png into
`--out`, re-writing the checkpoint at each new best so an interrupted run still leaves a model.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.config import ModelConfig  # noqa: E402
from kernels.wkv6_reference import wkv6_chunked  # noqa: E402
from tools import demo_data  # noqa: E402
from tools import train_forward as TF  # noqa: E402
from tools.demo_report import finish  # noqa: E402



def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=".traindata")
    ap.add_argument("--out", default="models/demo")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and a few steps, to debug on a CPU")
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--ctx-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--time-budget-s", type=float, default=440.0, help="wall time of the training loop")
    ap.add_argument("--max-steps", type=int, default=0, help="cap on the steps (0: the time budget decides)")
    ap.add_argument("--evals", type=int, default=24, help="validations over the run")
    ap.add_argument("--wkv-chunk", type=int, default=32)
    ap.add_argument("--val-windows", type=int, default=0, help="cap on validation windows (0: all)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: its default)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    if ap.parse_known_args(argv)[0].tiny:  # defaults for a CPU debug run; explicit flags still win
        ap.set_defaults(n_layer=3, n_embd=64, head_size=32, vocab_size=512, ctx_len=64, batch_size=8,
                        warmup_steps=5, max_steps=30, time_budget_s=120.0, evals=3, val_windows=32)
    args = ap.parse_args(argv)
    args.argv = sys.argv if argv is None else ["tools/train_demo.py", *argv]
    return args


def make_config(args: argparse.Namespace, vocab_size: int) -> tuple[ModelConfig, dict]:
    """The reference's config fields (config.json) and the engine's ModelConfig they imply."""
    C = args.n_embd
    raw = {"n_layer": args.n_layer, "n_embd": C, "dim_att": C, "dim_ffn": int(C * 3.5) // 32 * 32,
           "head_size": args.head_size, "head_size_divisor": 8, "tmix": "x060c2", "tmix2": "gold",
           "cmix": "x060", "cmix2": "x060", "inv_other_layer_ratio": 3, "kv_cache_compression_ratio": 16,
           "rope": None, "use_one_minus_w": 1, "use_v2": 1, "vocab_size": vocab_size, "ctx_len": args.ctx_len}
    gold_start = int(raw["n_layer"] * (raw["inv_other_layer_ratio"] - 1) / raw["inv_other_layer_ratio"])
    cfg = ModelConfig(n_layer=raw["n_layer"], n_embd=C, vocab_size=vocab_size, dim_att=C, dim_ffn=raw["dim_ffn"],
                      head_size=args.head_size, gold_start=gold_start,
                      compressed_dim=int(C / raw["kv_cache_compression_ratio"]), ctx_len=args.ctx_len)
    return cfg, raw


def optimizer_for(params: dict[str, torch.Tensor], args: argparse.Namespace, fused: bool) -> torch.optim.AdamW:
    """Weight decay on the matrices (the reference's lr_decay group), none on vectors and LoRA mixes."""
    decay = [p for n, p in params.items() if n.endswith(".weight") and p.dim() == 2]
    rest = [p for n, p in params.items() if not (n.endswith(".weight") and p.dim() == 2)]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.99), eps=1e-8, fused=fused)


def lr_at(step: int, total: int, args: argparse.Namespace) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    frac = min(1.0, (step - args.warmup_steps) / max(1, total - args.warmup_steps))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


class Trainer:
    def __init__(self, args, cfg, train_ids: np.ndarray, val_ids: np.ndarray):
        self.args, self.cfg, self.dev = args, cfg, torch.device(args.device)
        self.train_ids = torch.from_numpy(train_ids.astype(np.int64)).to(self.dev)
        T = args.ctx_len
        n_val = (len(val_ids) - 1) // T
        self.val_windows = torch.from_numpy(np.lib.stride_tricks.sliding_window_view(
            val_ids.astype(np.int64), T + 1)[: n_val * T: T].copy())
        if args.val_windows and len(self.val_windows) > args.val_windows:  # evenly spread, deterministic
            pick = torch.linspace(0, len(self.val_windows) - 1, args.val_windows).round().long()
            self.val_windows = self.val_windows[pick]
        self.val_windows = self.val_windows.to(self.dev)
        self.gen = torch.Generator(device="cpu").manual_seed(args.seed)
        self.params = {k: v.to(self.dev).requires_grad_() for k, v in TF.init_params(cfg, args.seed).items()}
        self.opt = optimizer_for(self.params, args, fused=self.dev.type == "cuda")
        self.wkv = lambda *a: wkv6_chunked(*a, chunk_size=args.wkv_chunk)
        self.amp = dict(device_type=self.dev.type, dtype=torch.bfloat16, enabled=self.dev.type == "cuda")

    def batch(self) -> torch.Tensor:
        T, B = self.args.ctx_len, self.args.batch_size
        starts = torch.randint(0, len(self.train_ids) - T - 1, (B,), generator=self.gen).to(self.dev)
        return self.train_ids[starts[:, None] + torch.arange(T + 1, device=self.dev)]

    def step(self, lr: float) -> torch.Tensor:
        for g in self.opt.param_groups:
            g["lr"] = lr
        with torch.autocast(**self.amp):
            loss = TF.loss_fn(self.params, self.cfg, self.batch(), wkv=self.wkv)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params.values(), 1.0)
        self.opt.step()
        return loss.detach()

    @torch.no_grad()
    def val_loss(self) -> float:
        total, n = 0.0, 0
        for chunk in self.val_windows.split(self.args.batch_size):
            with torch.autocast(**self.amp):
                total += float(TF.loss_fn(self.params, self.cfg, chunk, wkv=self.wkv)) * len(chunk)
            n += len(chunk)
        return total / n

    def bf16_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to(torch.bfloat16).cpu().clone() for k, v in self.params.items()}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def save_model(out: Path, state: dict[str, torch.Tensor], raw_config: dict) -> None:
    torch.save(state, out / "model.pth.tmp")
    (out / "model.pth.tmp").replace(out / "model.pth")
    (out / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import sentencepiece as spm

    train_docs, val_docs = demo_data.load_split(args.data_dir)
    demo_data.train_tokenizer(train_docs, out / "tokenizer.model", args.vocab_size)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    train_ids, val_ids = demo_data.encode_docs(sp, train_docs), demo_data.encode_docs(sp, val_docs)
    cfg, raw = make_config(args, sp.get_piece_size())
    log = {"command": " ".join(args.argv), "seed": args.seed, "args": {k: v for k, v in vars(args).items() if k != "argv"},
           "data": {"train_docs": len(train_docs), "val_docs": [n for n, _ in val_docs],
                    "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids)),
                    "train_chars": sum(len(t) for _, t in train_docs)},
           "unigram_entropy_val": demo_data.unigram_entropy(val_ids),
           "unigram_xent_val_under_train": demo_data.unigram_entropy(val_ids, train_ids),
           "card": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
           "torch": torch.__version__, "train_loss": [], "val_loss": []}
    trainer = Trainer(args, cfg, train_ids, val_ids)
    log["params"] = sum(p.numel() for p in trainer.params.values())
    log["prep_s"] = time.time() - t_start
    print(f"prep {log['prep_s']:.1f}s: {len(train_ids)} train / {len(val_ids)} val tokens, vocab {cfg.vocab_size}, "
          f"{log['params']} params, unigram entropy {log['unigram_entropy_val']:.3f}", flush=True)

    t0 = time.time()
    total = args.max_steps or 10**9
    eval_every, best, best_step, pending = max(1, (args.max_steps or 1000) // args.evals), float("inf"), -1, []
    step = 0
    while step < total:
        pending.append(trainer.step(lr_at(step, total, args)))
        step += 1
        if step == 3:
            sync(args.device)
            t_cal = time.time()
        if step == 13 and not args.max_steps:  # fix the schedule from the timed steps 3..13
            sync(args.device)
            per_step = (time.time() - t_cal) / 10
            total = 13 + int((args.time_budget_s - (time.time() - t0)) * 0.93 / per_step)
            eval_every = max(20, total // args.evals)
            log["calibrated_step_s"] = per_step
            print(f"{per_step * 1000:.0f} ms/step -> {total} steps, validation every {eval_every}", flush=True)
        last = step == total or time.time() - t0 > args.time_budget_s
        if step % 10 == 0 or last:
            losses = torch.stack(pending).float().cpu().tolist()
            log["train_loss"] += [[step - len(losses) + i + 1, round(x, 4)] for i, x in enumerate(losses)]
            pending = []
        if step % eval_every == 0 or last:
            v = trainer.val_loss()
            log["val_loss"].append([step, round(v, 4)])
            print(f"step {step}/{total} {time.time() - t0:.0f}s lr {lr_at(step - 1, total, args):.2e} "
                  f"train {np.mean([x for _, x in log['train_loss'][-50:]]):.3f} val {v:.3f}", flush=True)
            if v < best:
                best, best_step = v, step
                save_model(out, trainer.bf16_state(), raw)
        if last:
            log["stopped_by_time"] = step < total
            break
    log.update(steps=step, planned_steps=total, tokens_seen=step * args.batch_size * args.ctx_len,
               train_wall_s=time.time() - t0, best_val_loss=best, best_step=best_step)
    if args.device.startswith("cuda"):
        log["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    finish(out, log, train_docs, val_docs, t_start, trainer)
    return log


if __name__ == "__main__":
    main()
