"""Conformance in bfloat16 on a GPU: top-1 agreement and max |logit difference| per case.

    python benchmarks/conformance_bf16.py [--conformance ../shared/conformance] [--device cuda]

Prints one JSON line per case and a markdown table. The reference logits are float32 (CPU); a
bfloat16 model differs by its rounding, so the figure of merit is top-1 agreement on every row
(rows whose reference top-2 margin is below the observed error are counted separately: there a
bf16 flip is rounding, not a defect)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.loader import load_checkpoint  # noqa: E402
from engine.model import GoldFinchModel  # noqa: E402


def compare(ours: torch.Tensor, ref: np.ndarray) -> dict:
    ours = ours.float().cpu()
    ref_t = torch.from_numpy(ref).float()
    diff = (ours - ref_t).abs()
    top2 = ref_t.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    agree = ours.argmax(-1) == ref_t.argmax(-1)
    row_err = diff.max(-1).values
    return {"rows": int(agree.numel()), "top1_agree": int(agree.sum()),
            "disagree_with_clear_margin": int((~agree & (margin > 2 * row_err)).sum()),
            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}


def run_case(case: Path, dtype: torch.dtype, device: str) -> dict:
    g = np.load(case / "golden.npz")
    model = GoldFinchModel(load_checkpoint(case, dtype=dtype, device=device))
    tokens = torch.from_numpy(g["tokens"]).to(device)
    full, _ = model.forward(tokens, all_logits=True)
    P = int(g["prefix_len"])
    logits, state = model.forward(tokens[:, :P])
    rows = [logits]
    for t in range(P, tokens.shape[1]):
        logits, state = model.forward(tokens[:, t:t + 1], state)
        rows.append(logits)
    return {"case": case.name, "dtype": str(dtype).replace("torch.", ""), "device": device,
            "full": compare(full, g["logits_full"]), "step": compare(torch.stack(rows, 1), g["logits_step"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conformance", default=str(Path(__file__).resolve().parents[2] / "shared" / "conformance"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    results = [run_case(c, dtype, args.device) for c in sorted(Path(args.conformance).iterdir())
               if (c / "golden.npz").is_file()]
    for r in results:
        print(json.dumps(r))
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"\n{args.dtype} on {name}\n")
    print("| case | pass | rows | top-1 agree | max abs diff | mean abs diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        for kind in ("full", "step"):
            c = r[kind]
            print(f"| {r['case']} | {kind} | {c['rows']} | {c['top1_agree']}/{c['rows']} "
                  f"| {c['max_abs_diff']:.4f} | {c['mean_abs_diff']:.5f} |")


if __name__ == "__main__":
    main()
