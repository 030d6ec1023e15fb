"""`kernels.finch_mix` (a Finch time mix's five token-shift mixes in one pass) against the PyTorch it
replaced (the LoRA's second product as a batched matmul, then the mixing pass: eager, and compiled
as `engine.layer_ops` compiled it), one layer at the 1.5B shape (C = 2048, five mixes of rank 32,
bf16, one sequence's rows with the token shift inside), on the GPU:

    python benchmarks/bench_finch_mix.py [--rows 2048,16384,65536] [--tiles 64x128x4,32x128x4,...]

GPU time of a call replayed from a CUDA graph (`gpu_timing.graph_ms`), with the bytes an ideal pass
moves (read x, write five mixes) over the card's copy bandwidth. Writes JSON and a markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpu_timing import card_info, commit_id, copy_bandwidth, graph_ms, write_result  # noqa: E402

from kernels.finch_mix import TILES, finch_mix  # noqa: E402

C, N_MIX, R = 2048, 5, 32


def pytorch_mixes(x, carried, h, w2, maa):
    """What the model ran before the kernel: shift, batched matmul, mixing pass."""
    prev = torch.cat([carried, x[:-1]])
    dx = prev - x
    mix = torch.bmm(h.view(x.shape[0], N_MIX, -1).transpose(0, 1), w2)
    return x + dx * (maa[:, None, :] + mix)


def bench(rows: list[int], tiles: list[tuple[int, int, int]], gbps: float) -> list[dict]:
    compiled = torch.compile(pytorch_mixes, dynamic=True)
    out = []
    for N in rows:
        x = torch.randn(N, C, device="cuda").bfloat16()
        carried = torch.randn(1, C, device="cuda").bfloat16()
        h = torch.tanh(torch.randn(N, N_MIX * R, device="cuda")).bfloat16()
        w2 = (torch.randn(N_MIX, R, C, device="cuda") * 0.1).bfloat16()
        maa = torch.rand(N_MIX, C, device="cuda").bfloat16()
        want = pytorch_mixes(*(t.double() for t in (x, carried, h, w2, maa)))
        got = finch_mix(x, carried, h, w2, maa, True)
        row = {"rows": N, "max_rel_err": ((got.double() - want).abs().max() / want.abs().max()).item(),
               "eager_ms": graph_ms(lambda: pytorch_mixes(x, carried, h, w2, maa), inner=10),
               "compiled_ms": graph_ms(lambda: compiled(x, carried, h, w2, maa), inner=10),
               "ideal_ms": (1 + N_MIX) * N * C * 2 / (gbps * 1e9) * 1e3}
        row["kernel_ms"] = {"x".join(map(str, t)): graph_ms(lambda t=t: finch_mix(x, carried, h, w2, maa, True, t),
                                                            inner=10) for t in tiles}
        print(row, flush=True)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="2048,16384,65536")
    ap.add_argument("--tiles", default="x".join(map(str, TILES)) + ",64x128x4,64x64x4,128x64x8,64x128x8",
                    help="BMxBCxWARPS, comma-separated; the first is the default")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",") if t]
    gbps = copy_bandwidth() / 1e9
    info = {**card_info(), "commit": commit_id(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    rows = bench([int(x) for x in args.rows.split(",") if x], tiles, gbps)
    names = list(rows[0]["kernel_ms"]) if rows else []
    md = [f"# bench_finch_mix: {info['card']}, commit {info['commit']}, {info['date']}", "",
          f"copy bandwidth {gbps:,.0f} GB/s; one Finch layer's five mixes, C = {C}, rank {R}, bf16; GPU time (graph replay)",
          "", "| rows | " + " | ".join(f"kernel {n}" for n in names) + " | PyTorch compiled | eager | ideal | max rel err |",
          "| --- | " + " | ".join("---" for _ in names) + " | --- | --- | --- | --- |"]
    md += [f"| {r['rows']:,} | " + " | ".join(f"{r['kernel_ms'][n] * 1e3:.1f} us" for n in names)
           + f" | {r['compiled_ms'] * 1e3:.1f} us | {r['eager_ms'] * 1e3:.1f} us | {r['ideal_ms'] * 1e3:.1f} us"
           f" | {r['max_rel_err']:.1e} |" for r in rows]
    write_result(args.out, "bench_finch_mix", {**info, "copy_GBps": gbps, "rows": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
