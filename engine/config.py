"""GoldFinch model configuration, inferred from a checkpoint's state dict.

Every field but `rope` (and the two Finch-C2 switches, which default to the paper's setting) can be
read off the reference code's key names and shapes; a `config.json` beside the weights overrides.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

TMIX_FINCH_C2 = "x060c2"  # Finch-C2: no bonus u, v2 residual, k * (1 - decay), LayerNorm on the output
TMIX_FINCH = "x060"  # Finch / RWKV-6: gate, bonus u, GroupNorm on the output
TMIX_KINDS = (TMIX_FINCH_C2, TMIX_FINCH)


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of the GOLD layers, as the reference builds it: theta = base * rebase."""

    base: float = 10000.0
    rebase: float = 1.0
    rescale: float = 1.0

    @property
    def theta(self) -> float:
        return self.base * self.rebase


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int
    n_embd: int
    vocab_size: int
    dim_att: int
    dim_ffn: int
    head_size: int
    gold_start: int  # first GOLD layer; layers below it are Finch (RNN) layers
    compressed_dim: int  # values per token in the compressed key cache (n_embd / ratio)
    tmix: str = TMIX_FINCH_C2
    use_one_minus_w: bool = True
    use_v2: bool = True
    head_size_divisor: int = 8
    rope: RopeConfig | None = None
    ctx_len: int = 4096  # the length the checkpoint was trained at (informational)

    def __post_init__(self) -> None:
        if self.tmix not in TMIX_KINDS:
            raise ValueError(f"tmix: unsupported time-mix kind {self.tmix!r} (supported: {TMIX_KINDS})")
        if self.dim_att != self.n_embd:
            # GOLD layers mix keys (dim_att wide) with n_embd-wide token-shift weights.
            raise ValueError(f"dim_att: GOLD layers need dim_att == n_embd, got {self.dim_att} != {self.n_embd}")
        if self.dim_att % self.head_size:
            raise ValueError(f"head_size: {self.head_size} does not divide dim_att {self.dim_att}")
        if not 0 < self.gold_start <= self.n_layer:
            raise ValueError(f"gold_start: {self.gold_start} outside (0, n_layer={self.n_layer}]")

    @property
    def n_head(self) -> int:
        return self.dim_att // self.head_size

    @property
    def n_finch(self) -> int:
        return self.gold_start

    @property
    def n_gold(self) -> int:
        return self.n_layer - self.gold_start

    @property
    def gold_tail_len(self) -> int:
        """Positions of a prompt's tail that the first GOLD layer must see: each GOLD block looks one
        token back twice (time mix and channel mix), so the last logit depends on 2 * n_gold + 1."""
        return 2 * self.n_gold + 1

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["rope"] = None if self.rope is None else vars(self.rope).copy()
        return out


def gold_start_from_ratio(n_layer: int, inv_other_layer_ratio: float) -> int:
    """The reference's `get_second_submodel_layer_id`."""
    r = inv_other_layer_ratio
    return int(n_layer * (r - 1) / r)


def _layer_ids(keys: list[str]) -> list[int]:
    return sorted({int(k.split(".")[1]) for k in keys if k.startswith("blocks.")})


def infer_config(shapes: Mapping[str, tuple[int, ...]]) -> ModelConfig:
    """Reads the architecture off a state dict's key names and shapes (no tensor data needed)."""

    def need(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise KeyError(f"missing tensor {key!r}: not a GoldFinch checkpoint?")
        return shapes[key]

    vocab_size, n_embd = need("emb.weight")
    layers = _layer_ids(list(shapes))
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"blocks: layer ids must be 0..n-1, found {layers[:8]}...")
    n_layer = len(layers)
    gold = [i for i in layers if f"blocks.{i}.att.query.weight" in shapes]
    if not gold:
        raise ValueError("blocks: no GOLD layer (att.query.weight) found: not a GoldFinch checkpoint")
    gold_start = gold[0]
    if gold != list(range(gold_start, n_layer)):
        raise ValueError(f"blocks: GOLD layers must be the top of the stack, found {gold}")
    if gold_start == 0:
        raise ValueError("blocks: a GoldFinch needs at least one Finch layer below the GOLD layers")
    n_head, head_size = need("blocks.0.att.time_faaaa")
    dim_att = need("blocks.0.att.receptance.weight")[0]
    dim_ffn = need("blocks.0.ffn.key.weight")[0]
    compressed_dim = need("w_kv_cache_a.weight")[0]
    if "blocks.0.att.gate.weight" in shapes:
        tmix, use_v2 = TMIX_FINCH, False
    else:
        tmix, use_v2 = TMIX_FINCH_C2, "blocks.0.att.time_value2_w1" in shapes
    return ModelConfig(
        n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, dim_att=dim_att, dim_ffn=dim_ffn,
        head_size=head_size, gold_start=gold_start, compressed_dim=compressed_dim, tmix=tmix,
        use_one_minus_w=tmix == TMIX_FINCH_C2, use_v2=use_v2,
    )


_JSON_FIELDS = {
    "n_layer", "n_embd", "vocab_size", "dim_att", "dim_ffn", "head_size", "tmix", "use_one_minus_w",
    "use_v2", "head_size_divisor", "ctx_len",
}


def apply_overrides(config: ModelConfig, raw: Mapping[str, Any]) -> ModelConfig:
    """Applies a reference-style `config.json` on top of the inferred config.

    Unknown keys of the training config (dropout, alibi, ...) are ignored; `tmix2`/`cmix`/`cmix2`
    must name what this server implements, and `inv_other_layer_ratio` sets the GOLD start."""
    changes: dict[str, Any] = {}
    for key in _JSON_FIELDS & raw.keys():
        value = raw[key]
        if key in ("use_one_minus_w", "use_v2"):
            value = bool(value)
        changes[key] = value
    if raw.get("tmix2", "gold") != "gold":
        raise ValueError(f"tmix2: only GOLD upper layers are supported, config says {raw['tmix2']!r}")
    for key in ("cmix", "cmix2"):
        if raw.get(key, "x060") != "x060":
            raise ValueError(f"{key}: only the x060 channel mix is supported, config says {raw[key]!r}")
    for key in ("alibi", "brope"):
        if raw.get(key):
            raise ValueError(f"{key}: not supported (only rotary embedding or none)")
    if raw.get("tmix") == TMIX_FINCH:
        changes.setdefault("use_v2", False)
        changes.setdefault("use_one_minus_w", False)
    n_layer = int(raw.get("n_layer", config.n_layer))
    if "inv_other_layer_ratio" in raw:
        changes["gold_start"] = gold_start_from_ratio(n_layer, raw["inv_other_layer_ratio"])
    if "kv_cache_compression_ratio" in raw:
        changes["compressed_dim"] = int(int(raw.get("n_embd", config.n_embd)) / raw["kv_cache_compression_ratio"])
    if "rope" in raw:
        rope = raw["rope"]
        changes["rope"] = None if not rope else RopeConfig(**{k: float(v) for k, v in rope.items()})
    return replace(config, **changes)
