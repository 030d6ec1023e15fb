#!/usr/bin/env python3
"""WKV6 kernels on a GPU at the 1.5B shape (H=32, K=V=64, one layer, bf16): decode and prefill.

    python3 benchmarks/bench_wkv6.py [--out results.json] [--quick]

Decode (`wkv6_decode`, states updated in place) at batch 1/8/64/256: median of CUDA-event timings,
once as launched from Python (what an eager decode loop pays) and once per call inside a captured
CUDA graph (the GPU time); the bandwidth roofline ratio is (state read + written + inputs + outputs)
bytes / GPU time / the card's bandwidth, measured here by a device-to-device copy (bytes read +
written). Prefill (`wkv6_prefill`) at 4K/16K/64K/128K tokens of one sequence, plus one packed batch.
Baselines: the PyTorch reference path (`kernels.dispatch` with GOLDFINCH_KERNELS=reference) and,
if importable, flash-linear-attention's `fused_recurrent_rwkv6` / `chunk_rwkv6`.
Prints JSON, then a markdown table; `--out` (default $OUT/bench_wkv6.json when OUT is set) saves it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_timing import card_info, copy_bandwidth, graph_ms, median_ms  # noqa: E402
from kernels import wkv6_prefill as prefill_mod  # noqa: E402
from kernels.wkv6_decode import wkv6_decode  # noqa: E402
from kernels.wkv6_prefill import wkv6_prefill  # noqa: E402
from kernels.wkv6_reference import wkv6_chunked, wkv6_step  # noqa: E402

H, K, V = 32, 64, 64
DT = torch.bfloat16

try:
    from fla.ops.rwkv6 import chunk_rwkv6, fused_recurrent_rwkv6
    import fla
    FLA = getattr(fla, "__version__", "?")
except Exception as e:  # noqa: BLE001
    chunk_rwkv6 = fused_recurrent_rwkv6 = None
    FLA = None
    FLA_ERROR = f"{type(e).__name__}: {e}"


def kernel_breakdown_us(fn, calls=3) -> dict[str, float]:
    """Device time per call of each kernel `fn` launches (torch.profiler), in microseconds."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            out[e.key[:60]] = round(t / calls, 2)
    return out


def inputs(T: int, seed: int, num_slots: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r, k = (torch.randn(T, H, K, device="cuda", generator=g, dtype=DT) for _ in range(2))
    v = torch.randn(T, H, V, device="cuda", generator=g, dtype=DT)
    w = -(torch.randn(T, H, K, device="cuda", generator=g) - 1.0).exp().to(DT)
    u = (torch.randn(H, K, device="cuda", generator=g) * 0.5).to(DT)
    pool = torch.randn(num_slots, H, K, V, device="cuda", generator=g) * 0.1
    return r, k, v, w, u, pool


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def bench_decode(batches, bw, quick):
    rows = []
    for B in batches:
        r, k, v, w, u, pool = inputs(B, seed=B, num_slots=2 * B + 8)
        slots = torch.randperm(2 * B + 8, device="cuda")[:B]
        row = {"batch": B}
        # correctness against the reference step, on copies of the pool
        p1, p2 = pool.clone(), pool.clone()
        y1 = wkv6_decode(r, k, v, w, u, p1, slots)
        y2 = wkv6_step(r, k, v, w, u, p2, slots)
        row["rel_err_y"], row["rel_err_state"] = rel_err(y1, y2), rel_err(p1, p2)
        fn = lambda: wkv6_decode(r, k, v, w, u, pool, slots)  # noqa: E731
        row["triton_eager_us"] = median_ms(fn, inner=20) * 1e3
        try:
            row["triton_graph_us"] = graph_ms(fn) * 1e3
        except Exception as e:  # noqa: BLE001  (no graph: fall back to the eager time)
            row["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            row["triton_graph_us"] = row["triton_eager_us"]
        if B in (1, 256):
            try:
                row["kernels_us"] = kernel_breakdown_us(fn, calls=20)
            except Exception as e:  # noqa: BLE001
                row["kernels_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        row["reference_us"] = median_ms(lambda: wkv6_step(r, k, v, w, u, pool, slots), repeats=10 if quick else 20) * 1e3
        if fused_recurrent_rwkv6 is not None:
            def fla_step():
                y, ht = fused_recurrent_rwkv6(r[:, None], k[:, None], v[:, None], w[:, None], u, scale=1.0,
                                              initial_state=pool[slots], output_final_state=True)
                pool[slots] = ht
                return y
            try:
                row["fla_us"] = median_ms(fla_step, repeats=20) * 1e3
            except Exception as e:  # noqa: BLE001
                row["fla_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        nbytes = 2 * B * H * K * V * 4 + B * H * (3 * K + V) * 2 + B * H * V * 2 + H * K * 2 + B * 8
        row["bytes"] = nbytes
        row["achieved_GBps"] = nbytes / (row["triton_graph_us"] * 1e-6) / 1e9
        row["roofline_ratio"] = row["achieved_GBps"] * 1e9 / bw
        row["roofline_floor_us"] = nbytes / bw * 1e6
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_prefill(lengths, bw, quick, packed=None):
    rows = []
    cases = [(f"1x{T}", [T]) for T in lengths]
    if packed:
        cases.append(packed)
    for name, lens in cases:
        T = sum(lens)
        r, k, v, w, u, pool = inputs(T, seed=T, num_slots=len(lens) + 4)
        slots = torch.arange(len(lens), device="cuda") + 2
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        row = {"case": name, "tokens": T, "sequences": len(lens)}
        if T <= 16384:  # correctness against the float32 reference (chunked form)
            p1, p2 = pool.clone(), pool.clone()
            y1 = wkv6_prefill(r, k, v, w, u, cu, p1, slots)
            ys = []
            for b in range(len(lens)):
                sl = slice(cu[b], cu[b + 1])
                yb, sb = wkv6_chunked(r[sl][None], k[sl][None], v[sl][None], w[sl][None], u, p2[slots[b]][None])
                p2[slots[b]] = sb[0]
                ys.append(yb[0])
            y2 = torch.cat(ys)
            row["rel_err_y"], row["rel_err_state"] = rel_err(y1, y2), rel_err(p1, p2)
            reps = 2 if quick else 3
            row["reference_ms"] = median_ms(lambda: [wkv6_chunked(r[cu[b]:cu[b + 1]][None], k[cu[b]:cu[b + 1]][None],
                                                                   v[cu[b]:cu[b + 1]][None], w[cu[b]:cu[b + 1]][None],
                                                                   u, pool[slots[b]][None]) for b in range(len(lens))],
                                            warmup=1, repeats=reps)
        fn = lambda: wkv6_prefill(r, k, v, w, u, cu, pool, slots)  # noqa: E731
        row["triton_ms"] = median_ms(fn, warmup=3, repeats=10 if quick else 20)
        row["triton_Mtok_s"] = T / (row["triton_ms"] * 1e-3) / 1e6
        if T >= 65536:
            try:
                row["kernels_us"] = kernel_breakdown_us(fn)
            except Exception as e:  # noqa: BLE001
                row["kernels_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        if chunk_rwkv6 is not None:
            cu_t = torch.tensor(cu, device="cuda", dtype=torch.long)

            def fla_prefill():
                y, ht = chunk_rwkv6(r[None], k[None], v[None], w[None], u, scale=1.0, initial_state=pool[slots],
                                    output_final_state=True, cu_seqlens=cu_t if len(lens) > 1 else None)
                pool[slots] = ht
                return y
            try:
                if T <= 16384:
                    p3 = pool.clone()
                    y3, h3 = chunk_rwkv6(r[None], k[None], v[None], w[None], u, scale=1.0, initial_state=p3[slots],
                                         output_final_state=True, cu_seqlens=cu_t if len(lens) > 1 else None)
                    p3[slots] = h3
                    row["fla_rel_err_y"], row["fla_rel_err_state"] = rel_err(y3[0], y2), rel_err(p3, p2)
                row["fla_ms"] = median_ms(fla_prefill, warmup=3, repeats=10 if quick else 20)
                row["fla_Mtok_s"] = T / (row["fla_ms"] * 1e-3) / 1e6
            except Exception as e:  # noqa: BLE001
                row["fla_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        nbytes = T * H * (3 * K + V) * 2 + T * H * V * 2 + 2 * len(lens) * H * K * V * 4
        row["min_bytes"] = nbytes
        row["roofline_ratio"] = nbytes / (row["triton_ms"] * 1e-3) / bw
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# the default (diagonal blocks row by row, one warp a program, one tf32 pass for bf16) and the choices
# it was picked from
_CUBE = dict(diag_walk=False)
VARIANTS = [dict(), dict(precision="tf32x3"), dict(num_warps=2), dict(num_warps=4, chunk_warps=8), dict(chunk_warps=2),
            _CUBE, dict(_CUBE, num_warps=2), dict(_CUBE, diag_channels=8), dict(_CUBE, diag_products=False),
            dict(diag_unroll=False), dict(max_registers=168), dict(max_registers=128),
            dict(diag_unroll=False, max_registers=168), dict(diag_unroll=False, num_warps=2)]


def bench_variants(T, quick):
    """The prefill kernels' launch choices (`PrefillTuning`) for bf16 inputs: speed and error."""
    rows = []
    r, k, v, w, u, pool = inputs(T, seed=1, num_slots=4)
    slots = torch.tensor([1], device="cuda")
    rs, ks, vs, ws = (x[:4096] for x in (r, k, v, w))
    p_ref = pool.clone()
    y_ref, s_ref = wkv6_chunked(rs[None], ks[None], vs[None], ws[None], u, p_ref[slots])
    for variant in VARIANTS:
        tuning = prefill_mod.PrefillTuning(**variant)
        p = pool.clone()
        y = wkv6_prefill(rs, ks, vs, ws, u, [0, 4096], p, slots, tuning)
        row = {"variant": str(variant or "default"), "rel_err_y_4k": rel_err(y, y_ref[0]),
               "rel_err_state_4k": rel_err(p[slots], s_ref)}
        scratch = pool.clone()  # timing overwrites the slot's state
        row["ms"] = median_ms(lambda: wkv6_prefill(r, k, v, w, u, [0, T], scratch, slots, tuning), warmup=2,
                              repeats=5 if quick else 10)
        row["Mtok_s"] = T / (row["ms"] * 1e-3) / 1e6
        try:
            row["kernels_us"] = kernel_breakdown_us(lambda: wkv6_prefill(r, k, v, w, u, [0, T], scratch, slots, tuning))
        except Exception as e:  # noqa: BLE001
            row["kernels_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(res) -> str:
    lines = [f"WKV6 on {res['card']} ({res['sms']} SMs), H={H} K=V={K}, one layer, bf16 inputs, fp32 states; "
             f"copy bandwidth {res['copy_GBps']:.0f} GB/s; fla {res['fla'] or 'not available'}", "",
             "| decode batch | Triton eager us | Triton graph us | roofline floor us | bandwidth ratio | reference us | fla us | rel err y / state |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res.get("decode", []):
        fla = f"{r['fla_us']:.1f}" if "fla_us" in r else "-"
        lines.append(f"| {r['batch']} | {r['triton_eager_us']:.1f} | {r['triton_graph_us']:.2f} | "
                     f"{r['roofline_floor_us']:.2f} | {r['roofline_ratio']:.2f} | {r['reference_us']:.1f} | {fla} | "
                     f"{r['rel_err_y']:.1e} / {r['rel_err_state']:.1e} |")
    lines += ["", "| prefill | Triton ms | Triton Mtok/s | bandwidth ratio | reference ms | fla ms | fla Mtok/s | rel err y / state | fla rel err y / state |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res.get("prefill", []):
        ref = f"{r['reference_ms']:.1f}" if "reference_ms" in r else "-"
        fla = (f"{r['fla_ms']:.2f} | {r['fla_Mtok_s']:.1f}") if "fla_ms" in r else "- | -"
        err = f"{r['rel_err_y']:.1e} / {r['rel_err_state']:.1e}" if "rel_err_y" in r else "-"
        ferr = f"{r['fla_rel_err_y']:.1e} / {r['fla_rel_err_state']:.1e}" if "fla_rel_err_y" in r else "-"
        lines.append(f"| {r['case']} | {r['triton_ms']:.2f} | {r['triton_Mtok_s']:.1f} | {r['roofline_ratio']:.2f} | "
                     f"{ref} | {fla} | {err} | {ferr} |")
    if res.get("variants"):
        lines += ["", "| prefill launch choice | ms | Mtok/s | rel err y (4K) | rel err state (4K) |", "| --- | --- | --- | --- | --- |"]
        for r in res["variants"]:
            lines.append(f"| {r['variant']} | {r['ms']:.2f} | {r['Mtok_s']:.1f} | {r['rel_err_y_4k']:.1e} | "
                         f"{r['rel_err_state_4k']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="result file (.json; .md beside it) or folder (default: $OUT)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and sizes")
    ap.add_argument("--sections", default="", help="comma-separated subset of decode,prefill,variants")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_wkv6: needs a CUDA device")
    torch.manual_seed(0)
    res = {**card_info(), "fla": FLA, "fla_error": None if FLA else FLA_ERROR}
    res["copy_GBps"] = copy_bandwidth() / 1e9
    print(json.dumps(res), flush=True)
    lengths = [4096, 16384] if args.quick else [4096, 16384, 65536, 131072]
    sections = {
        "decode": lambda: bench_decode([1, 8, 64, 256], res["copy_GBps"] * 1e9, args.quick),
        "prefill": lambda: bench_prefill(lengths, res["copy_GBps"] * 1e9, args.quick,
                                         packed=("16 seqs x 1K", [1024] * 16)),
        "variants": lambda: bench_variants(16384 if args.quick else 65536, args.quick),
    }
    for name, run in sections.items():
        if args.sections and name not in args.sections.split(","):
            continue
        try:
            res[name] = run()
        except Exception as e:  # noqa: BLE001  (report what did run)
            res[name] = []
            res[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:2000]}"
            print(f"{name} failed: {res[name + '_error']}", flush=True)
    out = args.out or os.environ.get("OUT")
    if out and (Path(out).is_dir() or not out.endswith(".json")):  # a folder: the file goes in it
        out = str(Path(out) / "bench_wkv6.json")
    text = json.dumps(res, indent=1)
    print(text)
    table = markdown(res)
    print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        Path(out).with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
