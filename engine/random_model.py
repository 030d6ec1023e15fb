"""A clearly named random-weight GoldFinch ('goldfinch-random-test') for tests and for a server
started without a model before the demo model exists. Its output is noise."""
from __future__ import annotations

from pathlib import Path

import torch

from .config import ModelConfig
from .loader import Checkpoint, expected_shapes

RANDOM_TEST_CONFIG = ModelConfig(n_layer=6, n_embd=128, vocab_size=512, dim_att=128, dim_ffn=448, head_size=64,
                                 gold_start=4, compressed_dim=8)
# the paper's 1.5B shape: 16 Finch-C2 layers, 8 GOLD layers, world vocabulary
PAPER_1B5_CONFIG = ModelConfig(n_layer=24, n_embd=2048, vocab_size=65536, dim_att=2048, dim_ffn=7168, head_size=64,
                               gold_start=16, compressed_dim=128)


def random_checkpoint(config: ModelConfig = RANDOM_TEST_CONFIG, seed: int = 0, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> Checkpoint:
    g = torch.Generator(device=device).manual_seed(seed)  # made where it lives: 1.5B params on a GPU
    weights = {}
    for name, shape in sorted(expected_shapes(config).items()):
        kw = dict(generator=g, device=device)
        if name.endswith(("ln0.weight", "ln1.weight", "ln2.weight", "ln_out.weight", "ln_x.weight", "ln_q.weight",
                          "ln_k.weight", "ln_v.weight")):
            t = torch.ones(shape, device=device)
        elif name.endswith(".bias"):
            t = torch.zeros(shape, device=device)
        elif "time_decay" in name and len(shape) == 3:
            t = torch.rand(shape, **kw) * 4 - 5  # decays exp(-exp(-5..-1))
        elif "time_maa" in name and len(shape) == 3 and shape[0] == 1:
            t = torch.rand(shape, **kw)
        else:
            fan_in = shape[-1] if len(shape) > 1 else 1
            t = torch.randn(shape, **kw) / fan_in ** 0.5
        weights[name] = t.to(dtype=dtype)
    return Checkpoint(config=config, weights=weights, path=Path("goldfinch-random-test"))
