"""What a decode step must at least cost on a card: bytes moved at the copy bandwidth, or
arithmetic at the matmul rate, whichever is larger (shapes from `engine.loader.expected_shapes`).

A decode step reads every weight once and each sequence's RNN state (read and written). A sequence
with a K/V working set reads its materialised keys and values (n_gold x 2 x dim_att values per
cached token); one without derives them again: per cached token and GOLD layer, the decompression
matmul (W_b, redone per layer), the key/value mixing LoRAs and the key/value LoRAs, reading the
compressed entry and the token's embedding row.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.config import ModelConfig  # noqa: E402
from engine.loader import expected_shapes  # noqa: E402


def derive_flops_per_token(cfg: ModelConfig) -> int:
    """FLOPs to derive one cached token's keys and values for every GOLD layer."""
    s = expected_shapes(cfg)
    total = 0
    for layer in range(cfg.gold_start, cfg.n_layer):
        b = f"blocks.{layer}.att."
        total += 2 * math.prod(s["w_kv_cache_b.weight"])
        total += 2 * math.prod(s[b + "time_maa_kv_w1"]) + 2 * math.prod(s[b + "time_maa_kv_w2"])
        total += 2 * (math.prod(s[b + "time_key_w1"]) + math.prod(s[b + "time_key_w2"]))
        total += 2 * (math.prod(s[b + "time_value_w1"]) + math.prod(s[b + "time_value_w2"]))
    return total


def decode_floor(cfg: ModelConfig, batch: int, context: int, with_sets: int, copy_GBps: float,
                 tflops: float, dtype_bytes: int = 2) -> dict:
    """Lower bound of one decode step of `batch` sequences at `context` cached tokens, `with_sets`
    of them holding K/V working sets. Returns bytes, flops and seconds."""
    n_params = sum(math.prod(v) for v in expected_shapes(cfg).values())
    state_bytes = (cfg.n_finch * cfg.n_head * cfg.head_size ** 2 * 4
                   + 2 * cfg.n_layer * cfg.n_embd * dtype_bytes)
    kv_per_token = 2 * cfg.n_gold * cfg.dim_att * dtype_bytes
    derive_bytes_per_token = cfg.n_gold * (cfg.compressed_dim * dtype_bytes + 4 + cfg.n_embd * dtype_bytes)
    deriving = batch - with_sets
    bytes_ = (n_params * dtype_bytes + batch * 2 * state_bytes + with_sets * context * kv_per_token
              + deriving * context * derive_bytes_per_token)
    flops = 2 * n_params * batch + deriving * context * derive_flops_per_token(cfg)
    seconds = max(bytes_ / (copy_GBps * 1e9), flops / (tflops * 1e12))
    return {"bytes": bytes_, "flops": flops, "seconds": seconds}
