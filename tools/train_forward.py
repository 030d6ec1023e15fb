"""A differentiable full-sequence GoldFinch forward for training, made of the serving arithmetic.

`forward(params, cfg, tokens)` composes `engine.layers` (the same functions the server runs) and
`kernels.wkv6_reference.wkv6_chunked` over whole [B, T] batches: every position goes through every
layer, GOLD layers attend causally over all keys. `tests/test_train_forward.py` checks it against
`engine.model.GoldFinchModel.forward(..., all_logits=True)`, so what is trained is what is served.

`init_params(cfg)` initialises every tensor of `engine.loader.expected_shapes(cfg)` (the reference's
key names and shapes) as the reference code does: `src/model.py` generate_init_weight and the
`__init__` of `tmix/tmix_x060c2.py`, `tmix/tmix_gold.py` and `cmix/cmix_x060.py`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from engine import layers as L
from engine.config import ModelConfig
from engine.loader import expected_shapes
from kernels.wkv6_reference import wkv6_chunked

WkvFn = Callable[..., tuple[Tensor, Tensor]]


# ---- initialisation ------------------------------------------------------------------------------
def _ddd(C: int) -> Tensor:
    return (torch.arange(C, dtype=torch.float32) / C).view(1, 1, C)


def _block_vectors(cfg: ModelConfig, i: int) -> dict[str, Tensor]:
    """The `time_*` tensors of block i and its channel mix, as the reference modules create them."""
    C, A, H, N = cfg.n_embd, cfg.dim_att, cfg.n_head, cfg.head_size
    r01 = i / (cfg.n_layer - 1)
    r10 = 1.0 - i / cfg.n_layer
    ddd = _ddd(C)
    p, out = f"blocks.{i}.", {}
    out[p + "ffn.time_maa_k"] = 1.0 - ddd ** r10
    out[p + "ffn.time_maa_r"] = 1.0 - ddd ** r10
    a = p + "att."
    uni = lambda *shape: torch.empty(*shape).uniform_(-0.01, 0.01)  # noqa: E731
    if i < cfg.gold_start:  # Finch-C2 (x060c2)
        out[a + "time_maa_x"] = 1.0 - ddd ** r10
        out[a + "time_maa_r"] = 1.0 - ddd ** (0.5 * r10)
        out[a + "time_maa_k"] = 1.0 - ddd ** r10
        out[a + "time_maa_v"] = 1.0 - (ddd ** r10 + 0.3 * r01)
        out[a + "time_maa_w"] = 1.0 - ddd ** r10
        out[a + "time_maa_v2"] = 1.0 - (ddd ** r10 + 0.3 * r01)
        out[a + "time_maa_w2"] = uni(5, 32, C)
        out[a + "time_maa_w1"] = torch.zeros(C, 32 * 5)
        n = torch.arange(A, dtype=torch.float32)
        out[a + "time_decay"] = (-6 + 5 * (n / (A - 1)) ** (0.7 + 1.3 * r01)).view(1, 1, A)
        out[a + "time_decay_w1"] = torch.zeros(C, 64)
        out[a + "time_decay_w2"] = uni(64, A)
        out[a + "time_value2_w1"] = torch.zeros(C, 64)
        out[a + "time_value2_w2"] = uni(64, A)
        zigzag = ((n + 1) % 3 - 1) * 0.1
        out[a + "time_faaaa"] = (r01 * (1 - n / (A - 1)) + zigzag).view(H, N)
    else:  # GOLD
        lora = max(C // 16, 64)
        out[a + "time_maa_x"] = 1.0 - ddd ** r10
        out[a + "time_maa_q"] = 1.0 - ddd ** (0.5 * r10)
        out[a + "time_maa_v_cache"] = 1.0 - ddd ** r10
        out[a + "time_maa_k"] = 1.0 - ddd ** r10
        out[a + "time_maa_v"] = 1.0 - (ddd ** r10 + 0.3 * r01)
        out[a + "time_maa_q_w1"] = torch.zeros(C, 32)
        out[a + "time_maa_q_w2"] = uni(32, C)
        out[a + "time_maa_kv_w1"] = torch.zeros(C, 64)
        out[a + "time_maa_kv_w2"] = uni(2, 32, C)
        out[a + "time_key_w1"] = torch.zeros(C, lora)
        out[a + "time_key_w2"] = uni(lora, A)
        out[a + "time_value_w1"] = torch.zeros(C, lora)
        out[a + "time_value_w2"] = uni(lora, A)
    return out


def init_params(cfg: ModelConfig, seed: int = 0) -> dict[str, Tensor]:
    """float32 tensors under the reference names, initialised like the reference's fresh model."""
    torch.manual_seed(seed)
    shapes = expected_shapes(cfg)
    vectors: dict[str, Tensor] = {}
    for i in range(cfg.n_layer):
        vectors |= _block_vectors(cfg, i)
    params: dict[str, Tensor] = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name in vectors:
            t = vectors[name]
        elif ".ln" in name or "ln_" in name:
            if "ln_x" in name and name.endswith(".weight"):
                t = torch.full(shape, ((1 + int(name.split(".")[1])) / cfg.n_layer) ** 0.7)
            else:
                t = torch.ones(shape) if name.endswith(".weight") else torch.zeros(shape)
        elif name == "emb.weight":
            t = torch.empty(shape).uniform_(-1e-4, 1e-4)
        elif name == "head.weight":
            V, C = shape
            t = torch.nn.init.orthogonal_(torch.empty(shape), gain=0.5 * math.sqrt(V / C) if V > C else 0.5)
        else:
            scale = 0.0 if any(k in name for k in (".att.output.", ".ffn.value.", ".ffn.receptance.")) else (
                0.1 if ".att.key." in name else 1.0)
            t = torch.zeros(shape) if scale == 0 else torch.nn.init.orthogonal_(torch.empty(shape), gain=scale)
        if tuple(t.shape) != tuple(shape):
            raise AssertionError(f"init of {name}: shape {tuple(t.shape)} != {shape}")
        params[name] = t.float().contiguous()
    return params


# ---- the forward ---------------------------------------------------------------------------------
def shift(x: Tensor) -> Tensor:
    """[B, T, C] -> each position's previous row, zero before the first (a fresh sequence)."""
    return F.pad(x, (0, 0, 1, -1))


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _wkv_fp32(wkv: WkvFn, *args: Tensor) -> Tensor:
    """The recurrence outside autocast: its arithmetic stays float32 as the serving kernels keep it."""
    dev = args[0].device.type
    with torch.autocast(dev, enabled=False):
        return wkv(*args)[0]


def finch_block(x: Tensor, w: L.LayerWeights, cfg: ModelConfig, wkv: WkvFn) -> Tensor:
    B, T, C = x.shape
    H, N = cfg.n_head, cfg.head_size
    xa = L.layer_norm(x, w, "ln1")
    r, k, v, log_decay, u, extra = L.finch_tmix_projections(_rows(xa), _rows(shift(xa)), w, cfg)
    heads = lambda t: t.reshape(B, T, H, N)  # noqa: E731
    state = torch.zeros(B, H, N, N, device=x.device, dtype=torch.float32)
    y = _wkv_fp32(wkv, heads(r), heads(k), heads(v), heads(log_decay), u, state)
    x = x + L.finch_tmix_output(y.reshape(B * T, -1).to(r.dtype), extra, w, cfg).view(B, T, C)
    xf = L.layer_norm(x, w, "ln2")
    return x + L.channel_mix(_rows(xf), _rows(shift(xf)), w).view(B, T, C)


def _keys_values(proto: Tensor, values: Tensor, w: L.LayerWeights, batched: bool) -> tuple[Tensor, Tensor]:
    """`engine.layers.gold_keys_values` (one sequence) for each sequence of the batch."""
    if batched:
        return torch.vmap(lambda p, v: L.gold_keys_values(p, v, w))(proto, values)
    pairs = [L.gold_keys_values(p, v, w) for p, v in zip(proto, values)]
    return torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])


def gold_block(x: Tensor, proto: Tensor, token_values: Tensor, w: L.LayerWeights, cfg: ModelConfig,
               vmap: bool = True) -> Tensor:
    B, T, C = x.shape
    H, D = cfg.n_head, cfg.head_size
    xa = L.layer_norm(x, w, "ln1")
    q = L.gold_query(_rows(xa), _rows(shift(xa)), w).view(B, T, H, D)
    keys, values = _keys_values(proto, token_values, w, vmap)
    k, v = keys.view(B, T, H, D), values.view(B, T, H, D)
    if cfg.rope is not None:
        pos = torch.arange(T, device=x.device)
        q = L.rotary(q, pos, cfg.rope.theta, cfg.rope.rescale)
        k = L.rotary(k, pos, cfg.rope.theta, cfg.rope.rescale)
    q, k, v = (t.to(v.dtype) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    o = L.layer_norm(o.transpose(1, 2).reshape(B * T, C), w, "att.ln_x")
    x = x + L.linear(o, w, "att.output").view(B, T, C)
    xb = L.layer_norm(x, w, "ln2")
    return x + L.channel_mix(_rows(xb), _rows(shift(xb)), w).view(B, T, C)


def forward(params: dict[str, Tensor], cfg: ModelConfig, tokens: Tensor, wkv: WkvFn = wkv6_chunked,
            vmap: bool = True) -> Tensor:
    """tokens [B, T] (each row a fresh sequence) -> logits [B, T, vocab]."""
    C = cfg.n_embd
    x0 = F.layer_norm(F.embedding(tokens, params["emb.weight"]), (C,),
                      params["blocks.0.ln0.weight"], params["blocks.0.ln0.bias"])
    blocks = [L.LayerWeights(params, f"blocks.{i}.") for i in range(cfg.n_layer)]
    x = x0
    for i in range(cfg.gold_start):
        x = finch_block(x, blocks[i], cfg, wkv)
    compressed = F.linear(x, params["w_kv_cache_a.weight"])
    x0c = x0.to(compressed.dtype)
    proto = L.rms_norm(F.linear(torch.cat([x0c, compressed], -1), params["w_kv_cache_b.weight"]))
    token_values = L.rms_norm(x0c)
    for i in range(cfg.gold_start, cfg.n_layer):
        x = gold_block(x, proto, token_values, blocks[i], cfg, vmap)
    x = F.layer_norm(x, (C,), params["ln_out.weight"], params["ln_out.bias"])
    return F.linear(x, params["head.weight"])


def loss_fn(params: dict[str, Tensor], cfg: ModelConfig, batch: Tensor, **kw) -> Tensor:
    """Mean next-token cross-entropy (nats) of a [B, T + 1] batch."""
    logits = forward(params, cfg, batch[:, :-1], **kw)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
