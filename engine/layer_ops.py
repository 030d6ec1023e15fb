"""The per-layer arithmetic a model step calls, plain or through `torch.compile`.

Between the matmuls a Finch or GOLD layer is dozens of small elementwise ops (token-shift mixes,
LoRA activations, norms); compiled, each chain becomes one fused kernel, which cuts both the memory
traffic of a long prefill and the kernel count of a decode step. Compiled only on CUDA.

Shapes: automatic dynamic (`torch.compile(dynamic=None)`): a function's first call compiles for its
shapes, and a call with other row counts recompiles once with the row dimension symbolic, so one
compile serves every batch and prompt length while the channel dimensions stay static, and Inductor
sizes its kernels for them (with every dimension symbolic, `dynamic=True`, the norms over channels
took twice as long). H100, 1.5B shape, one process per mode on one machine (session 10): a 4K
prompt in one step 26.9 -> 25.1 ms, 16K (8K-token steps) 96.7 -> 91.8 ms; a Finch layer's two
layer norms at 4,096 rows 45.5 -> 22.8 and 37.5 -> 20.0 us; decode at batch 64 graph replay 9.74 ->
9.51 ms. `GOLDFINCH_COMPILE_SHAPES=dynamic` restores the old mode.
"""
from __future__ import annotations

import os

import torch

from . import decode_ops as D
from . import layers as L

ENV_VAR = "GOLDFINCH_COMPILE"
# Below this many new tokens a step is bound by the host launching kernels, and each compiled
# call's guard checks (~0.1 ms) cost more than fusion saves: H200, 1.5B shape, prefill of 4K
# tokens 59K tok/s compiled vs 72K eager; 16K: 135K vs 112K; 128K: 139K vs 117K.
MIN_COMPILED_TOKENS = 8192
MIN_COMPILED_ENV_VAR = "GOLDFINCH_MIN_COMPILED_TOKENS"  # a benchmark knob: the threshold above
# Deriving a history's GOLD keys and values in PyTorch (with rotary, or without a working set;
# otherwise `kernels.gold_kv_derive` does it) is a dozen passes over [rows, C] per layer, GPU-bound
# from a few thousand rows and queued behind the prompt's Finch layers, so the compiled call's host
# cost is hidden: compiled from this many rows (H100, 4,096 rows and their scattered copy to the
# pages: 446 us a layer eager, 334 us compiled)
MIN_COMPILED_DERIVE_ROWS = 2048
FUNCTIONS = ("finch_tmix_projections", "finch_tmix_output", "channel_mix", "gold_query", "gold_keys_values_rows",
             "gold_keys_values",
             "finch_tmix_in", "finch_tmix_out", "channel_mix_residual", "gold_query_in", "gold_attention_out",
             "gold_keys_values_rows_all_layers", "finch_tmix_in_stacked", "channel_mix_residual_stacked",
             "finch_tmix_projections_shifted", "channel_mix_residual_shifted", "decode_decompress_rows")
MODULES = (L, D)  # where the FUNCTIONS live (decode_ops: the decode step's stacked-weight versions)
SHAPES_ENV_VAR = "GOLDFINCH_COMPILE_SHAPES"  # auto (default) | dynamic: see the module's docstring


def compile_requested(device: torch.device) -> bool:
    """Compiled on CUDA unless GOLDFINCH_COMPILE=0; never on the CPU."""
    return device.type == "cuda" and os.environ.get(ENV_VAR, "1").strip() not in ("0", "false", "no")


def _min_compiled_tokens() -> int:
    raw = os.environ.get(MIN_COMPILED_ENV_VAR, "").strip()
    if not raw:
        return MIN_COMPILED_TOKENS
    if not raw.isdigit():
        raise ValueError(f"{MIN_COMPILED_ENV_VAR} must be a whole number of tokens, got {raw!r}")
    return int(raw)


class LayerOps:
    def __init__(self, compiled: bool, shift_inside: bool | None = None) -> None:
        """`shift_inside` (default: when compiled): a one-sequence step's Finch blocks pass the
        carried token-shift rows to the `*_shifted` functions, which read the shifted rows inside
        their first fused kernel (eager they are materialised all the same; tests set it to check
        that the arithmetic is unchanged)."""
        self.compiled = compiled
        self.shift_inside = compiled if shift_inside is None else shift_inside
        shapes = os.environ.get(SHAPES_ENV_VAR, "auto")
        if shapes not in ("auto", "dynamic"):
            raise ValueError(f"{SHAPES_ENV_VAR} must be auto or dynamic, got {shapes!r}")
        dynamic = True if shapes == "dynamic" else None
        for name in FUNCTIONS:
            fn = next(getattr(module, name) for module in MODULES if hasattr(module, name))
            setattr(self, name, torch.compile(fn, dynamic=dynamic) if compiled else fn)
        self.eager = self if not compiled else LayerOps(False)
        self.min_compiled_tokens = _min_compiled_tokens()

    def for_tokens(self, n: int) -> "LayerOps":
        """The functions for a step of n new tokens (a decode step inside a CUDA graph is compiled
        whatever its size: a replay pays no host cost)."""
        return self if n >= self.min_compiled_tokens else self.eager

    def for_derived_rows(self, n: int) -> "LayerOps":
        """The functions for deriving n rows of GOLD keys and values."""
        return self if n >= min(self.min_compiled_tokens, MIN_COMPILED_DERIVE_ROWS) else self.eager
