#!/usr/bin/env python3
"""Paged decode attention (split-K Triton kernel) on a GPU: H=32, D=64, pages of 64, bf16, one layer.

    python3 benchmarks/bench_paged_attention.py [--out results.json] [--quick] [--no-sweep]

Cases: batch 1/8/64/256 at a 4K context, batch 1/16 at 128K, every sequence at the full context,
its pages at shuffled block ids of one [num_blocks, 2, page, H*D] pool (K and V views, as the
engine's). For each: `kernels.dispatch.paged_attention` (default split count) timed as launched
from Python (median of CUDA-event timings: what an eager decode loop pays) and per call replayed
from a captured CUDA graph (the GPU time); GB/s of K/V bytes read (2 * B * context * H * D * 2) per
graph time, against the copy bandwidth measured here by a 1 GiB device-to-device copy (bytes read +
written). Baselines: the PyTorch reference (a loop over the batch) and SDPA on K/V already gathered
into dense [B, H, L, D] tensors (the gather itself timed apart; skipped where it would not fit).
`--no-sweep` skips timing other split counts. Prints JSON lines, then a markdown table; writes the
JSON to --out (default benchmarks/results/bench_paged_attention.json, and $OUT/ too when OUT is set).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gpu_timing  # noqa: E402
from gpu_timing import card_info, copy_bandwidth, median_ms  # noqa: E402
from kernels import dispatch  # noqa: E402
from kernels.paged_attention import paged_decode_attention_fwd  # noqa: E402
from kernels.paged_attention_reference import paged_decode_attention_reference  # noqa: E402

H, D, PAGE = 32, 64, 64
DT = torch.bfloat16
CASES = [(1, 4096), (8, 4096), (64, 4096), (256, 4096), (1, 131072), (16, 131072)]
SWEEP = [1, 2, 4, 8, 16, 32, 64]
STAGES = [1, 2, 3]  # software-pipelined page loop (tl.range num_stages)


def _inner(est_ms: float, target_ms: float = 2.0, most: int = 50) -> int:
    """Calls per timed sample so that one sample takes about target_ms."""
    return max(1, min(most, int(target_ms / max(est_ms, 1e-3))))


def graph_ms(fn, est_ms: float, repeats=20) -> float:
    """Per-call GPU time replayed from a CUDA graph of calls that take about 2 ms together."""
    return gpu_timing.graph_ms(fn, inner=_inner(est_ms), repeats=repeats, warmup=2)


def eager_ms(fn, est_ms: float, repeats=20) -> float:
    return median_ms(fn, warmup=3, repeats=repeats, inner=_inner(est_ms, most=20))


def estimate_ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return median_ms(fn, warmup=1, repeats=3)


def make_inputs(B: int, ctx: int, seed: int):
    """q [B, H, D]; K/V views of one shuffled pool; block tables [B, ctx / PAGE] int32; seq_lens = ctx."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    pages = ctx // PAGE
    num_blocks = B * pages + 16
    pool = torch.randn((num_blocks, 2, PAGE, H * D), device="cuda", dtype=DT, generator=g)
    k_pages = pool[:, 0].view(num_blocks, PAGE, H, D)
    v_pages = pool[:, 1].view(num_blocks, PAGE, H, D)
    ids = torch.randperm(num_blocks, device="cuda", generator=g)[:B * pages]
    block_tables = ids.view(B, pages).to(torch.int32)
    seq_lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn((B, H, D), device="cuda", dtype=DT, generator=g)
    return q, k_pages, v_pages, block_tables, seq_lens


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def gather_dense(k_pages, v_pages, block_tables):
    """K, V of every sequence as [B, H, L, D] (all sequences at the full table length)."""
    B, pages = block_tables.shape
    idx = block_tables.long()
    k = k_pages[idx].view(B, pages * PAGE, H, D).transpose(1, 2)
    v = v_pages[idx].view(B, pages * PAGE, H, D).transpose(1, 2)
    return k, v


def bench_case(B: int, ctx: int, bw: float, quick: bool, sweep: bool) -> dict:
    q, k_pages, v_pages, block_tables, seq_lens = make_inputs(B, ctx, seed=B * 7 + ctx)
    pages = ctx // PAGE
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = dispatch.default_num_splits(B, H, pages, sms)
    kv_bytes = 2 * B * ctx * H * D * q.element_size()
    row = {"batch": B, "context": ctx, "num_splits": splits, "kv_bytes": kv_bytes,
           "floor_us": kv_bytes / bw * 1e6}  # K/V read at the copy's bytes-moved rate
    repeats = 10 if quick else 20

    fn = lambda: dispatch.paged_attention(q, k_pages, v_pages, block_tables, seq_lens)  # noqa: E731
    out = fn()
    ref = paged_decode_attention_reference(q, k_pages, v_pages, block_tables, seq_lens)
    row["rel_err"] = rel_err(out, ref)
    est = estimate_ms(fn)
    row["triton_eager_us"] = eager_ms(fn, est, repeats) * 1e3
    try:
        row["triton_graph_us"] = graph_ms(fn, est, repeats) * 1e3
    except Exception as e:  # noqa: BLE001  (no graph: fall back to the eager time)
        row["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        row["triton_graph_us"] = row["triton_eager_us"]
    row["GBps"] = kv_bytes / (row["triton_graph_us"] * 1e-6) / 1e9
    row["roofline_ratio"] = row["GBps"] * 1e9 / bw  # against the copy's bytes read + written per second

    if sweep:
        row["sweep_graph_us"] = {}
        for s in SWEEP:
            for stages in STAGES:
                if s > pages:
                    continue
                f = lambda s=s, st=stages: paged_decode_attention_fwd(  # noqa: E731
                    q, k_pages, v_pages, block_tables, seq_lens, s, D ** -0.5, num_stages=st)
                key = s if stages == 1 else f"{s}/{stages}st"
                try:
                    row["sweep_graph_us"][key] = round(graph_ms(f, estimate_ms(f), repeats=10) * 1e3, 2)
                except Exception as e:  # noqa: BLE001
                    row["sweep_graph_us"][key] = f"{type(e).__name__}: {str(e)[:100]}"

    ref_fn = lambda: paged_decode_attention_reference(q, k_pages, v_pages, block_tables, seq_lens)  # noqa: E731
    row["reference_us"] = median_ms(ref_fn, warmup=1, repeats=3 if quick or ctx > 4096 else 10) * 1e3

    free, _ = torch.cuda.mem_get_info()
    if 3 * kv_bytes < 0.8 * free:  # gathered K and V, plus SDPA's and the gather's temporaries
        try:
            row["gather_us"] = median_ms(lambda: gather_dense(k_pages, v_pages, block_tables), warmup=1,
                                         repeats=5) * 1e3
            k, v = gather_dense(k_pages, v_pages, block_tables)
            qd = q[:, :, None, :]  # [B, H, 1, D]
            sdpa = lambda: F.scaled_dot_product_attention(qd, k, v)  # noqa: E731
            row["sdpa_rel_err"] = rel_err(sdpa()[:, :, 0], ref)
            est = estimate_ms(sdpa)
            row["sdpa_gathered_us"] = eager_ms(sdpa, est, repeats) * 1e3
            try:
                row["sdpa_gathered_graph_us"] = graph_ms(sdpa, est, repeats) * 1e3
            except Exception as e:  # noqa: BLE001
                row["sdpa_graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            del k, v
        except Exception as e:  # noqa: BLE001
            row["sdpa_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    else:
        row["sdpa_error"] = f"skipped: gathered K/V ({2 * kv_bytes / 2**30:.1f} GiB) would not fit"
    return row


def markdown(res) -> str:
    lines = [f"Paged decode attention on {res['card']} ({res['sms']} SMs), H={H} D={D} page {PAGE}, bf16, one "
             f"layer; copy bandwidth {res['copy_GBps']:.0f} GB/s (read + written); GB/s = K/V bytes read / graph time",
             "",
             "| batch | context | splits | Triton eager us | Triton graph us | K/V GB/s | / copy GB/s | "
             "floor us | reference us | SDPA gathered us (graph) | gather us | rel err |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["cases"]:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['context']} | - | {r['error'][:80]} |")
            continue
        sdpa = (f"{r['sdpa_gathered_us']:.1f} ({r.get('sdpa_gathered_graph_us', float('nan')):.1f})"
                if "sdpa_gathered_us" in r else "-")
        gather = f"{r['gather_us']:.0f}" if "gather_us" in r else "-"
        lines.append(f"| {r['batch']} | {r['context']} | {r['num_splits']} | {r['triton_eager_us']:.1f} | "
                     f"{r['triton_graph_us']:.1f} | {r['GBps']:.0f} | {r['roofline_ratio']:.2f} | "
                     f"{r['floor_us']:.1f} | {r['reference_us']:.0f} | {sdpa} | "
                     f"{gather} | {r['rel_err']:.1e} |")
    sweeps = [r for r in res["cases"] if r.get("sweep_graph_us")]
    if sweeps:
        keys = [s if st == 1 else f"{s}/{st}st" for s in SWEEP for st in STAGES]
        lines += ["", "| batch | context | " + " | ".join(f"{k} splits us" for k in keys) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in keys) + " |"]
        for r in sweeps:
            cells = []
            for s in keys:
                t = r["sweep_graph_us"].get(s, "-")
                cells.append(f"{t:.1f}" if isinstance(t, float) else ("err" if t != "-" else "-"))
            lines.append(f"| {r['batch']} | {r['context']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_paged_attention.json"))
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the split-count sweep")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_paged_attention: needs a CUDA device")
    torch.manual_seed(0)
    res = {**card_info(), "H": H, "D": D, "page": PAGE, "dtype": str(DT)}
    res["copy_GBps"] = copy_bandwidth() / 1e9
    print(json.dumps(res), flush=True)
    res["cases"] = []
    for B, ctx in CASES:
        try:
            row = bench_case(B, ctx, res["copy_GBps"] * 1e9, args.quick, args.sweep)
        except Exception as e:  # noqa: BLE001  (report what did run)
            row = {"batch": B, "context": ctx, "error": f"{type(e).__name__}: {str(e)[:1000]}"}
        torch.cuda.empty_cache()  # the case's pool (tens of GB at 128K) is gone with its frame
        res["cases"].append(row)
        print(json.dumps(row), flush=True)
    text = json.dumps(res, indent=1)
    print(text)
    table = markdown(res)
    print(table)
    outs = [Path(args.out)]
    if os.environ.get("OUT"):
        outs.append(Path(os.environ["OUT"]) / Path(args.out).name)
    for out in outs:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
