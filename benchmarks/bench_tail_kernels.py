"""The two kernels of a prompt's last step, each against the PyTorch it replaced, one GOLD layer at
the 1.5B shape (C = 2048, 32 heads of 64, LoRA ranks 32 and 128, bf16), on the GPU:

    python benchmarks/bench_tail_kernels.py [--rows 2048,4096,16384,65536] [--keys 4096,65536,1048576]

- `kernels.gold_kv_derive` (keys and values of N history rows, stored to shuffled page slots) against
  `layers.gold_keys_values_rows` eager and compiled plus the scattered copy to the pages (what
  `engine.gold_keys` did before), with the bytes an ideal pass would move (read the four inputs,
  write keys and values twice: returned and paged) over the card's copy bandwidth; and the 1.5B
  model's 8 GOLD layers derived by 8 launches against one launch of the stacked weights (what a
  prompt's last step does up to `gold_keys.STACKED_DERIVE_ROWS` rows);
- `kernels.tail_attention` (17 tail queries, end-aligned, over n keys) against masked SDPA (its
  reference), with the K/V bytes over the copy bandwidth.
Each timed as GPU time (replayed from a CUDA graph: `gpu_timing.graph_ms`) and as launched from Python
(median of CUDA-event timings, what an eager step pays on this host). Writes JSON and a markdown
table to --out.
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
from gpu_timing import card_info, commit_id, copy_bandwidth, graph_ms, median_ms, write_result  # noqa: E402

from engine import layers as L  # noqa: E402
from kernels.gold_kv_derive import gold_kv_derive  # noqa: E402
from kernels.gold_kv_derive_reference import GoldKVDeriveWeights  # noqa: E402
from kernels.tail_attention import tail_attention  # noqa: E402
from kernels.tail_attention_reference import tail_attention_reference  # noqa: E402

C, R_MIX, R, H, D, TAIL, N_GOLD = 2048, 32, 128, 32, 64, 17, 8


def _weights() -> tuple[GoldKVDeriveWeights, L.LayerWeights]:
    def t(*shape):
        return (torch.randn(*shape, device="cuda") * 0.05).to(torch.bfloat16)

    w = GoldKVDeriveWeights(t(C), t(C, 2 * R_MIX), t(2, R_MIX, C), t(C), t(C), t(C, R), t(R, C), t(C, R), t(R, C),
                            t(C), t(C), t(C), t(C))
    names = ("att.time_maa_v_cache", "att.time_maa_kv_w1", "att.time_maa_kv_w2", "att.time_maa_k", "att.time_maa_v",
             "att.time_key_w1", "att.time_key_w2", "att.time_value_w1", "att.time_value_w2", "att.ln_k.weight",
             "att.ln_k.bias", "att.ln_v.weight", "att.ln_v.bias")
    return w, L.LayerWeights({f"b.{n}": v for n, v in zip(names, w)}, "b.")


def bench_derive(rows: list[int], gbps: float) -> list[dict]:
    w, lw = _weights()
    compiled = torch.compile(L.gold_keys_values_rows, dynamic=True)
    out = []
    for N in rows:
        proto, values = (torch.randn(N, C, device="cuda") * 0.5).bfloat16(), (torch.randn(N, C, device="cuda") * 0.5).bfloat16()
        prev_p, prev_v = L.shift_one(proto), L.shift_one(values)
        slots = torch.randperm(N + 64, device="cuda")[:N]
        kp, vp = (torch.empty(N + 64, C, device="cuda", dtype=torch.bfloat16) for _ in range(2))

        def pytorch(fn):
            k, v = fn(proto, prev_p, values, prev_v, lw)
            kp.index_copy_(0, slots, k)
            vp.index_copy_(0, slots, v)

        kernel = lambda: gold_kv_derive(proto, prev_p, values, prev_v, w, slots, kp, vp)  # noqa: E731
        pk, pv = (torch.empty(N_GOLD, N + 64, C, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        layers = [w] + [_weights()[0] for _ in range(N_GOLD - 1)]  # each layer its own weights
        stacked = GoldKVDeriveWeights(*(torch.stack(ts).contiguous() for ts in zip(*layers)))
        per_layer = lambda: [gold_kv_derive(proto, prev_p, values, prev_v, layers[i], slots, pk[i], pv[i])  # noqa: E731
                             for i in range(N_GOLD)]
        row = {"rows": N, "kernel_ms": graph_ms(kernel, inner=10), "compiled_ms": graph_ms(lambda: pytorch(compiled), inner=10),
               "layers_one_launch_ms": graph_ms(lambda: gold_kv_derive(proto, prev_p, values, prev_v, stacked, slots,
                                                                      pk, pv), inner=5),
               "layers_per_launch_ms": graph_ms(per_layer, inner=5),
               "eager_ms": graph_ms(lambda: pytorch(L.gold_keys_values_rows), inner=10),
               "kernel_launched_ms": median_ms(kernel), "compiled_launched_ms": median_ms(lambda: pytorch(compiled)),
               "ideal_ms": 8 * N * C * 2 / (gbps * 1e9) * 1e3}
        print(row, flush=True)
        out.append(row)
    return out


def bench_tail(keys: list[int], gbps: float) -> list[dict]:
    out = []
    for n in keys:
        q = torch.randn(TAIL, H, D, device="cuda").bfloat16()
        k, v = (torch.randn(n, H, D, device="cuda").bfloat16() for _ in range(2))
        pos = torch.arange(n - TAIL, n, device="cuda")
        kernel, sdpa = lambda: tail_attention(q, k, v, pos), lambda: tail_attention_reference(q, k, v, pos)  # noqa: E731
        row = {"keys": n, "kernel_ms": graph_ms(kernel, inner=10), "sdpa_ms": graph_ms(sdpa, inner=10),
               "kernel_launched_ms": median_ms(kernel), "sdpa_launched_ms": median_ms(sdpa),
               "kv_bytes_ms": 2 * n * H * D * 2 / (gbps * 1e9) * 1e3}
        print(row, flush=True)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="2048,4096,16384,65536")
    ap.add_argument("--keys", default="4096,65536,1048576")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    gbps = copy_bandwidth() / 1e9
    info = {**card_info(), "commit": commit_id(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    derive = bench_derive([int(x) for x in args.rows.split(",") if x], gbps)
    tail = bench_tail([int(x) for x in args.keys.split(",") if x], gbps)
    md = [f"# bench_tail_kernels: {info['card']}, commit {info['commit']}, {info['date']}", "",
          f"copy bandwidth {gbps:,.0f} GB/s; one GOLD layer, C = {C}, bf16", "",
          "GPU time (graph replay); launched from Python in brackets", "",
          "| history rows | gold_kv_derive | PyTorch compiled + copy | eager + copy | speed-up vs compiled | ideal (8 passes) |",
          "| --- | --- | --- | --- | --- | --- |"]
    md += [f"| {r['rows']:,} | {r['kernel_ms'] * 1e3:.0f} us ({r['kernel_launched_ms'] * 1e3:.0f}) | "
           f"{r['compiled_ms'] * 1e3:.0f} us ({r['compiled_launched_ms'] * 1e3:.0f}) | {r['eager_ms'] * 1e3:.0f} us | "
           f"{r['compiled_ms'] / r['kernel_ms']:.2f}x | {r['ideal_ms'] * 1e3:.0f} us |" for r in derive]
    md += ["", f"| history rows | {N_GOLD} layers, one launch each | one launch (stacked weights) | speed-up |",
           "| --- | --- | --- | --- |"]
    md += [f"| {r['rows']:,} | {r['layers_per_launch_ms'] * 1e3:.0f} us | {r['layers_one_launch_ms'] * 1e3:.0f} us | "
           f"{r['layers_per_launch_ms'] / r['layers_one_launch_ms']:.2f}x |" for r in derive]
    md += ["", f"| keys ({TAIL} tail queries) | tail_attention | masked SDPA | speed-up | K/V bytes at copy bandwidth |",
           "| --- | --- | --- | --- | --- |"]
    md += [f"| {r['keys']:,} | {r['kernel_ms'] * 1e3:.0f} us ({r['kernel_launched_ms'] * 1e3:.0f}) | "
           f"{r['sdpa_ms'] * 1e3:.0f} us ({r['sdpa_launched_ms'] * 1e3:.0f}) | "
           f"{r['sdpa_ms'] / r['kernel_ms']:.2f}x | {r['kv_bytes_ms'] * 1e3:.0f} us |" for r in tail]
    write_result(args.out, "bench_tail_kernels", {**info, "copy_GBps": gbps, "derive": derive, "tail": tail},
                 "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
