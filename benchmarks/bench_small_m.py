"""Matrix products of a decode step at small M (1.5B shape, bf16): the projections a Finch or GOLD
block runs one by one against the same products stacked into fewer, larger calls.

    python benchmarks/bench_small_m.py [--batches 1,8,64]

A decode step at batch 1 is ~330 products of one row; each is a few microseconds of weight reading
that cuBLAS does not stream at full bandwidth. Stacked: rows of different inputs against weights
concatenated along N, keeping only each input's own column block ("diagonal blocks": the other
blocks are wasted arithmetic, free while the weights bound the time), or a batched product. GPU time
per variant replayed from a CUDA graph, as a fraction of reading the weights at the copy bandwidth
measured in the same run. Each variant cycles through enough copies of its weights (>= 512 MB) that
none is still in the 50 MB L2 cache when it is read again, as in a real step."""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import copy_bandwidth, graph_ms  # noqa: E402

D, FFN = 2048, 7168


def _w(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 0.02


def _tmix_separate(M):
    w, x = [_w(D, D) for _ in range(3)], [_w(M, D) for _ in range(4)]
    return lambda: [F.linear(x[0], w[0]), F.linear(x[1], w[1]), F.linear(x[2], w[2]), F.linear(x[3], w[2])]


def _tmix_stacked(M):
    w, x = _w(3 * D, D), _w(4 * M, D)
    return lambda: F.linear(x, w)


def _tmix_bmm(M):
    w, x = _w(3, D, D), _w(3, M, D)
    return lambda: torch.bmm(x, w.transpose(1, 2))


def _ffn_separate(M):
    wk, wr, x = _w(FFN, D), _w(D, D), _w(2, M, D)
    return lambda: [F.linear(x[0], wk), F.linear(x[1], wr)]


def _ffn_stacked(M):
    w, x = _w(FFN + D, D), _w(2 * M, D)
    return lambda: F.linear(x, w)


def _one(M, n=D, k=D):
    w, x = _w(n, k), _w(M, k)
    return lambda: F.linear(x, w)


def cycled(make, copies: int):
    """One call runs the next of `copies` instances (each with its own weights) in turn."""
    instances = itertools.cycle([make() for _ in range(copies)])
    return lambda: next(instances)()


# name: (factory of one instance, weight bytes it reads)
CASES = {
    "tmix r,k,v,v2 separate": (_tmix_separate, 3 * D * D * 2),
    "tmix stacked [4M, D] x [3D, D]": (_tmix_stacked, 3 * D * D * 2),
    "tmix r,k,v bmm [3, M, D] x [3, D, D]": (_tmix_bmm, 3 * D * D * 2),
    "ffn key + receptance separate": (_ffn_separate, (FFN + D) * D * 2),
    "ffn key + receptance stacked": (_ffn_stacked, (FFN + D) * D * 2),
    "one D x D": (_one, D * D * 2),
    "ffn value [M, FFN] x [D, FFN]": (lambda M: _one(M, D, FFN), FFN * D * 2),
    "head [M, D] x [V, D]": (lambda M: _one(M, 65536, D), 65536 * D * 2),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,64")
    args = ap.parse_args()
    bw = copy_bandwidth()
    print(json.dumps({"card": torch.cuda.get_device_name(), "copy_GBps": bw / 1e9}))
    for M in (int(b) for b in args.batches.split(",")):
        for name, (factory, weight_bytes) in CASES.items():
            copies = max(1, -(-(512 << 20) // weight_bytes))
            ms = graph_ms(cycled(lambda: factory(M), copies), inner=2 * copies)
            torch.cuda.empty_cache()
            print(json.dumps({"M": M, "case": name, "us": round(ms * 1e3, 2),
                              "of_bandwidth": round(weight_bytes / bw / (ms * 1e-3), 3)}), flush=True)


if __name__ == "__main__":
    main()
