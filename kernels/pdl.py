"""Programmatic dependent launch (PDL, Hopper and later) for the decode step's kernels.

Why: a batch-1 decode step is ~280 kernels of 2-20 us each, and each kernel's first memory
requests leave only when the one before it has finished: the card idles for the launch and the
ramp of every kernel. A kernel launched with PDL may become resident while the one before it still
runs; its programs issue what depends on no earlier kernel (L2 prefetches of their weight rows,
loads of weights) and then wait for the earlier kernel.

The rule that keeps it exact: every program of a kernel launched with PDL executes `gdc_wait`
(which returns once the preceding grid has completed and its memory is visible) before it writes
anything, or reads anything the kernel launched just before it may write, and signals
`gdc_launch_dependents` only after that wait, so that at most one kernel runs ahead: when a kernel
starts, every kernel but the one just before it has completed. So the weights, the step's inputs
(copied before its first kernel) and what earlier steps left (the WKV states) may be read before
the wait; the outputs of the kernel just before may not. A kernel launched without PDL (any
PyTorch op) starts after everything before it as usual. On other devices, under Triton's interpreter, and with
`GOLDFINCH_PDL=0` (A/B checks), kernels launch as plain launches and the wait is not compiled in.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

ENV_VAR = "GOLDFINCH_PDL"
# Launches of at most this many rows (sequences) use PDL. H100, 1.5B shape, the fused decode step
# replayed from a graph (A/B in one process, two rounds each): batch 1 1.898 -> 1.845
# ms, batch 4 2.226 -> 2.139; batch 8 2.692 -> 2.702 and batch 16 3.580 -> 3.758 (slower)
MAX_ROWS = 4


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def enabled(device: torch.device, rows: int) -> bool:
    """Whether a launch over `rows` rows on `device` uses PDL: a CUDA device of compute capability
    >= 9, at most MAX_ROWS rows, unless GOLDFINCH_PDL=0."""
    if device.type != "cuda" or rows > MAX_ROWS or os.environ.get(ENV_VAR, "1").strip() == "0":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(use_pdl: bool) -> dict:
    """The launch keyword that asks Triton for a PDL launch (none otherwise: the interpreter's
    launcher does not take it)."""
    return {"launch_pdl": True} if use_pdl else {}


@triton.jit
def prefetch_l2(ptrs):
    """Asks L2 for the lines at `ptrs` (no value, no wait): what a kernel may do before its PDL wait
    with addresses that depend on no earlier kernel, even where the data itself may still be written."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)
