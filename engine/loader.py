"""Loads GoldFinch checkpoints: the reference `.pth` state dicts and safetensors with the same names.

Files are memory-mapped, every tensor is checked against the shape the config implies (a missing,
unexpected or mis-shaped tensor fails with its key named), and cast to the requested dtype once.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from .config import TMIX_FINCH, TMIX_FINCH_C2, ModelConfig, apply_overrides, infer_config

WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")
MIX_LORA = 32  # D_MIX_LORA of the reference


class CheckpointError(ValueError):
    """A checkpoint that does not match the GoldFinch architecture; the message names the key."""


@dataclass(frozen=True)
class Checkpoint:
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    path: Path


def find_weights(path: str | os.PathLike) -> Path:
    """A weights file, or the single weights file inside a model folder."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"model path {str(p)!r} does not exist")
    found = sorted(f for f in p.iterdir() if f.suffix in WEIGHT_SUFFIXES)
    if len(found) != 1:
        names = [f.name for f in found] or "none"
        raise FileNotFoundError(f"model folder {str(p)!r} must hold exactly one weights file "
                                f"({'/'.join(WEIGHT_SUFFIXES)}), found {names}")
    return found[0]


def _open_tensors(path: Path) -> tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor]]:
    """Shapes of every tensor, and a getter that reads one (memory-mapped, no copy until cast)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        handle = safe_open(str(path), framework="pt", device="cpu")
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        return shapes, handle.get_tensor
    state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    return {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__


def _finch_shapes(cfg: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    C, A, H, N = cfg.n_embd, cfg.dim_att, cfg.n_head, cfg.head_size
    p = f"blocks.{i}.att."
    s: dict[str, tuple[int, ...]] = {p + f"time_maa_{n}": (1, 1, C) for n in "xwkvr"}
    s |= {p + "time_maa_w1": (C, MIX_LORA * 5), p + "time_maa_w2": (5, MIX_LORA, C),
          p + "time_decay": (1, 1, A), p + "time_decay_w1": (C, 64), p + "time_decay_w2": (64, A),
          p + "time_faaaa": (H, N), p + "ln_x.weight": (A,), p + "ln_x.bias": (A,),
          p + "output.weight": (C, A)}
    s |= {p + f"{n}.weight": (A, C) for n in ("receptance", "key", "value")}
    if cfg.tmix == TMIX_FINCH:
        s |= {p + "time_maa_g": (1, 1, C), p + "gate.weight": (A, C)}
    elif cfg.tmix == TMIX_FINCH_C2:
        s |= {p + "time_maa_v2": (1, 1, C)}
        if cfg.use_v2:
            s |= {p + "time_value2_w1": (C, 64), p + "time_value2_w2": (64, A)}
    return s


def _gold_shapes(cfg: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    C, A = cfg.n_embd, cfg.dim_att
    lora = max(C // 16, 64)
    p = f"blocks.{i}.att."
    s: dict[str, tuple[int, ...]] = {p + f"time_maa_{n}": (1, 1, C) for n in ("x", "q", "v_cache", "k", "v")}
    s |= {p + "time_maa_q_w1": (C, MIX_LORA), p + "time_maa_q_w2": (MIX_LORA, C),
          p + "time_maa_kv_w1": (C, MIX_LORA * 2), p + "time_maa_kv_w2": (2, MIX_LORA, C),
          p + "time_key_w1": (C, lora), p + "time_key_w2": (lora, A),
          p + "time_value_w1": (C, lora), p + "time_value_w2": (lora, A),
          p + "query.weight": (A, C), p + "output.weight": (C, A)}
    s |= {p + f"{n}.{w}": (A,) for n in ("ln_q", "ln_k", "ln_v", "ln_x") for w in ("weight", "bias")}
    return s


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a GoldFinch checkpoint with its shape, as the reference code names them."""
    C, V, F = cfg.n_embd, cfg.vocab_size, cfg.dim_ffn
    s: dict[str, tuple[int, ...]] = {
        "emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,),
        "ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C),
        "w_kv_cache_a.weight": (cfg.compressed_dim, C),
        "w_kv_cache_b.weight": (cfg.dim_att, cfg.compressed_dim + C),
    }
    for i in range(cfg.n_layer):
        b = f"blocks.{i}."
        s |= {b + f"{n}.{w}": (C,) for n in ("ln1", "ln2") for w in ("weight", "bias")}
        s |= {b + "ffn.time_maa_k": (1, 1, C), b + "ffn.time_maa_r": (1, 1, C),
              b + "ffn.key.weight": (F, C), b + "ffn.receptance.weight": (C, C),
              b + "ffn.value.weight": (C, F)}
        s |= _finch_shapes(cfg, i) if i < cfg.gold_start else _gold_shapes(cfg, i)
    return s


def check_shapes(found: Mapping[str, tuple[int, ...]], cfg: ModelConfig) -> None:
    want = expected_shapes(cfg)
    missing = sorted(want.keys() - found.keys())
    if missing:
        raise CheckpointError(f"missing tensor {missing[0]!r} (expected shape {want[missing[0]]})"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    unexpected = sorted(found.keys() - want.keys())
    if unexpected:
        raise CheckpointError(f"unexpected tensor {unexpected[0]!r}"
                              + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
    for key, shape in want.items():
        if tuple(found[key]) != shape:
            raise CheckpointError(f"tensor {key!r} has shape {tuple(found[key])}, expected {shape}")


def read_config(weights_path: Path, shapes: Mapping[str, tuple[int, ...]]) -> ModelConfig:
    try:
        config = infer_config(shapes)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{weights_path}: {exc.args[0]}") from None
    config_json = weights_path.parent / "config.json"
    if config_json.is_file():
        with open(config_json, encoding="utf-8") as f:
            config = apply_overrides(config, json.load(f))
    return config


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", progress: Iterable | None = None) -> Checkpoint:
    """Reads a checkpoint, validates it against its config and casts each tensor once.

    `progress`, if given, wraps the key iteration (e.g. a tqdm factory's result) for large models."""
    weights_path = find_weights(path)
    shapes, get = _open_tensors(weights_path)
    config = read_config(weights_path, shapes)
    check_shapes(shapes, config)
    keys = sorted(shapes)
    weights = {}
    for key in (progress(keys) if progress else keys):
        weights[key] = get(key).to(device=device, dtype=dtype).contiguous()
    return Checkpoint(config=config, weights=weights, path=weights_path)
