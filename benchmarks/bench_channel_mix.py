"""The decode step's channel mix at the 1.5B shape (C=2048, F=7168, bf16): the fused Triton kernels
(`kernels.channel_mix_decode`, two kernels) against what the decode step runs now (the compiled
`engine.decode_ops.channel_mix_residual_stacked`: cuBLAS products and inductor's fused kernels).

    python benchmarks/bench_channel_mix.py [--batches 1,8,16] [--out DIR]

Each variant runs 24 blocks' channel mixes in a chain (as in a step; each block has its own
weights, 1.6 GB in all, so none is in L2 when read), captured in a CUDA graph; per block: GPU time,
and the weights' bytes over it against the copy bandwidth measured in the same run. Also the
largest difference of each variant from the float32 reference."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpu_timing import card_info, copy_bandwidth, graph_ms  # noqa: E402

from engine import layers as L  # noqa: E402
from engine.decode_ops import channel_mix_residual_stacked  # noqa: E402
from kernels.channel_mix_decode import channel_mix_decode  # noqa: E402
from kernels.channel_mix_decode_reference import channel_mix_decode_reference  # noqa: E402

C, FFN, BLOCKS = 2048, 7168, 24
VARIANTS = {"fused 64/16/128 s4": {}, "fused 32/16/128 s4": {"block_n_kr": 32},
            "fused 64/32/128 s4": {"block_n_value": 32}, "fused 64/16/256 s3": {"block_k": 256, "num_stages": 3},
            "fused 32/16/256 s3": {"block_n_kr": 32, "block_k": 256, "num_stages": 3}}


class _Cfg:
    dim_ffn, n_embd = FFN, C


def _blocks():
    g = lambda *s, scale=1.0: torch.randn(*s, device="cuda", dtype=torch.bfloat16) * scale  # noqa: E731
    return [{"ffn.time_maa_k": g(C, scale=0.5), "ffn.time_maa_r": g(C, scale=0.5),
             L.CMIX_STACKED: g(FFN + C, C, scale=C ** -0.5), "ffn.value.weight": g(C, FFN, scale=FFN ** -0.5)}
            for _ in range(BLOCKS)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    res = {**card_info(), "copy_GBps": copy_bandwidth() / 1e9, "rows": []}
    blocks = _blocks()
    compiled = torch.compile(channel_mix_residual_stacked, dynamic=True)
    weight_bytes = ((FFN + C) * C + C * FFN) * 2
    for M in (int(b) for b in args.batches.split(",")):
        x, xf, prev = (torch.randn(M, C, device="cuda", dtype=torch.bfloat16) for _ in range(3))

        def now():
            y = x
            for w in blocks:
                y = compiled(y, xf, prev, w, _Cfg)
            return y

        def fused(**launch):
            def run():
                y = x
                for w in blocks:
                    y = channel_mix_decode(y, xf, prev, w["ffn.time_maa_k"], w["ffn.time_maa_r"], w[L.CMIX_STACKED],
                                           w["ffn.value.weight"], **launch)
                return y
            return run

        w0 = blocks[0]
        ref = channel_mix_decode_reference(x, xf, prev, w0["ffn.time_maa_k"], w0["ffn.time_maa_r"], w0[L.CMIX_STACKED],
                                           w0["ffn.value.weight"]).float()
        scale = ref.abs().max().item()
        one = {"now (compiled decode_ops)": lambda: compiled(x, xf, prev, w0, _Cfg)}
        one.update({name: (lambda launch=launch: channel_mix_decode(
            x, xf, prev, w0["ffn.time_maa_k"], w0["ffn.time_maa_r"], w0[L.CMIX_STACKED], w0["ffn.value.weight"],
            **launch)) for name, launch in VARIANTS.items()})
        chains = {"now (compiled decode_ops)": now, **{n: fused(**launch) for n, launch in VARIANTS.items()}}
        base = None
        for name, chain in chains.items():
            us = graph_ms(chain, inner=4, repeats=15) * 1e3 / BLOCKS
            base = base or us
            err = (one[name]().float() - ref).abs().max().item() / scale
            row = {"M": M, "variant": name, "us_per_block": us, "GBps": weight_bytes / (us * 1e-6) / 1e9,
                   "of_copy_bw": weight_bytes / (us * 1e-6) / (res["copy_GBps"] * 1e9), "speedup": base / us,
                   "rel_err": err}
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    lines = [f"Channel mix per block, {res['card']} ({res['sms']} SMs), torch {res['torch']}, Triton {res['triton']}; "
             f"copy bandwidth {res['copy_GBps']:.0f} GB/s; weights {weight_bytes / 1e6:.1f} MB per block", "",
             "| M | variant | us per block | GB/s | of copy bandwidth | speed-up vs now | rel err vs fp32 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['M']} | {r['variant']} | {r['us_per_block']:.1f} | {r['GBps']:.0f} | {r['of_copy_bw']:.2f} | "
              f"{r['speedup']:.2f}x | {r['rel_err']:.1e} |" for r in res["rows"]]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_channel_mix.json").write_text(json.dumps(res, indent=1))
    (Path(args.out) / "bench_channel_mix.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
