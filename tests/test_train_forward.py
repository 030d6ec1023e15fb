"""The training forward (tools/train_forward.py) is the serving model: same logits, same checkpoint."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.config import ModelConfig, RopeConfig  # noqa: E402
from engine.loader import expected_shapes, load_checkpoint  # noqa: E402
from engine.model import GoldFinchModel  # noqa: E402
from kernels.wkv6_reference import wkv6_chunked  # noqa: E402
from tools import train_forward as TF  # noqa: E402


def tiny_config(rope: RopeConfig | None = None) -> ModelConfig:
    # 4 layers with the reference's GOLD top third: int(4 * 2 / 3) = 2 Finch + 2 GOLD
    return ModelConfig(n_layer=4, n_embd=64, vocab_size=97, dim_att=64, dim_ffn=224, head_size=32,
                       gold_start=2, compressed_dim=4, rope=rope)


def perturbed_params(cfg: ModelConfig, seed: int = 1) -> dict[str, torch.Tensor]:
    """The reference init, plus noise so that the zero-initialised paths (att.output, ffn.value,
    LoRA w1) carry signal too."""
    params = TF.init_params(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in params.items()}


def write_checkpoint(folder: Path, params: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    torch.save(params, folder / "model.pth")
    raw = {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "dim_att": cfg.dim_att, "dim_ffn": cfg.dim_ffn,
           "head_size": cfg.head_size, "tmix": "x060c2", "tmix2": "gold", "cmix": "x060", "cmix2": "x060",
           "inv_other_layer_ratio": 3, "kv_cache_compression_ratio": cfg.n_embd // cfg.compressed_dim,
           "rope": None if cfg.rope is None else vars(cfg.rope), "vocab_size": cfg.vocab_size}
    (folder / "config.json").write_text(json.dumps(raw))


def test_init_matches_reference_names_and_shapes():
    cfg = tiny_config()
    params = TF.init_params(cfg)
    shapes = expected_shapes(cfg)
    assert {k: tuple(v.shape) for k, v in params.items()} == shapes
    assert torch.all(params["blocks.1.att.output.weight"] == 0) and torch.all(params["blocks.3.ffn.value.weight"] == 0)
    assert params["emb.weight"].abs().max() <= 1e-4
    assert torch.allclose(params["blocks.3.att.ln_x.weight"], torch.ones(64))  # ((3 + 1) / 4) ** 0.7


@pytest.mark.parametrize("rope", [None, RopeConfig(base=10000.0)], ids=["no-rope", "rope"])
def test_training_forward_equals_serving_model(tmp_path, rope):
    cfg = tiny_config(rope)
    params = perturbed_params(cfg)
    write_checkpoint(tmp_path, params, cfg)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.config == cfg
    model = GoldFinchModel(ckpt)
    tokens = torch.randint(0, cfg.vocab_size, (2, 45), generator=torch.Generator().manual_seed(0))
    served, _ = model.forward(tokens, all_logits=True)
    with torch.no_grad():
        trained = TF.forward(params, cfg, tokens)
        looped = TF.forward(params, cfg, tokens, vmap=False)
    assert served.shape == trained.shape == (2, 45, cfg.vocab_size)
    torch.testing.assert_close(trained, served, atol=1e-4, rtol=0)
    torch.testing.assert_close(looped, trained, atol=1e-5, rtol=0)


def test_training_forward_has_gradients_everywhere():
    cfg = tiny_config()
    params = {k: v.requires_grad_() for k, v in perturbed_params(cfg).items()}
    batch = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    loss = TF.loss_fn(params, cfg, batch, wkv=lambda *a: wkv6_chunked(*a, chunk_size=16))
    loss.backward()
    assert torch.isfinite(loss)
    no_grad = [k for k, p in params.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    # time_faaaa is u, unused by Finch-C2 with v2 (u = 0): the only parameter without a gradient
    assert sorted(no_grad) == [f"blocks.{i}.att.time_faaaa" for i in range(cfg.gold_start)]
    zero = [k for k, p in params.items() if p.grad is not None and not p.grad.abs().sum() > 0]
    assert not zero, zero
