"""Registers and spills of the WKV6 prefill output kernel for each launch choice, compiled offline
for an H100 (sm_90a) by Triton and the ptxas its wheel ships: no GPU needed.

    python benchmarks/registers_wkv6.py [--warps 1,2]

At one warp a program the kernel takes all 255 registers a thread may have (8 programs a
multiprocessor at most) and spills; what a choice does to that is a hint for `bench_wkv6.py
--sections variants`, which times them on the GPU. (The figures are those of the installed Triton;
the GPU machine's may allocate differently.)
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kernels.wkv6_prefill import BC, BD, wkv6_prefill_fwd_kernel  # noqa: E402

H, K = 32, 64  # the 1.5B shape's heads
POINTERS = {"r_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "w_ptr": "*fp32", "u_ptr": "*bf16",
            "y_ptr": "*bf16", "h_ptr": "*fp32", "cu_ptr": "*i32", "chunk_indices_ptr": "*i32"}
STRIDES = ("stride_rt", "stride_rh", "stride_kt", "stride_kh", "stride_wt", "stride_wh", "stride_vt", "stride_vh",
           "stride_yt", "stride_yh")
CHOICES = {"default": {}, "walk as a loop": {"DIAG_UNROLL": False},
           "[t, s, channels] diagonal": {"DIAG_WALK": False}}


def ptxas_report(diag: dict, num_warps: int, max_registers: int | None) -> str:
    constants = dict(H=H, K=K, V=K, BT=64, BC=BC, BK=K, BV=K, BD=BD, PRECISION="tf32", DIAG_PRODUCTS=True,
                     DIAG_WALK=True, DIAG_UNROLL=True) | diag
    signature = POINTERS | {s: "i32" for s in STRIDES} | {c: "constexpr" for c in constants}
    options = {"num_warps": num_warps} | ({"maxnreg": max_registers} if max_registers else {})
    compiled = triton.compile(ASTSource(fn=wkv6_prefill_fwd_kernel, signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
        err = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", err)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", err)
    return (f"{regs.group(1) if regs else '?'} registers, spills {spills.group(1)} B stored / "
            f"{spills.group(2)} B loaded" if spills else err[-200:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warps", default="1,2")
    ap.add_argument("--max-registers", default=",168", help="caps to try (empty: none)")
    args = ap.parse_args()
    for warps in (int(w) for w in args.warps.split(",")):
        for cap in (int(c) if c else None for c in args.max_registers.split(",")):
            for name, diag in CHOICES.items():
                print(f"{warps} warp(s), cap {cap or '-'}, {name}: {ptxas_report(diag, warps, cap)}", flush=True)


if __name__ == "__main__":
    main()
