"""Checkpoint loading: config inference, config.json overrides, safetensors, named errors."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from conftest import CONFORMANCE_DIR, load_model
from engine.config import infer_config
from engine.loader import CheckpointError, load_checkpoint


def _state_dict(case):
    return torch.load(CONFORMANCE_DIR / case / "model.pth", map_location="cpu", weights_only=True)


def test_inferred_config_equals_given(case, tmp_path):
    """Without config.json, everything but rotary is read off the state dict."""
    shutil.copy(CONFORMANCE_DIR / case / "model.pth", tmp_path / "model.pth")
    inferred = load_checkpoint(tmp_path).config
    given = load_checkpoint(CONFORMANCE_DIR / case).config
    raw = json.loads((CONFORMANCE_DIR / case / "config.json").read_text())
    assert replace(given, rope=None, ctx_len=inferred.ctx_len) == inferred
    assert (given.rope is not None) == bool(raw.get("rope"))
    assert inferred.gold_start == int(raw["n_layer"] * (raw["inv_other_layer_ratio"] - 1) / raw["inv_other_layer_ratio"])
    assert inferred.compressed_dim == raw["n_embd"] // raw["kv_cache_compression_ratio"]
    assert inferred.tmix == raw["tmix"] and inferred.n_head == raw["dim_att"] // raw["head_size"]


def test_safetensors_loads_the_same(case, tmp_path):
    from safetensors.torch import save_file

    save_file(_state_dict(case), str(tmp_path / "model.safetensors"))
    shutil.copy(CONFORMANCE_DIR / case / "config.json", tmp_path / "config.json")
    from engine.model import GoldFinchModel

    ck = load_checkpoint(tmp_path)
    reference = load_checkpoint(CONFORMANCE_DIR / case)
    assert ck.config == reference.config
    assert ck.weights.keys() == reference.weights.keys()
    assert all(torch.equal(ck.weights[k], reference.weights[k]) for k in ck.weights)
    tokens = torch.arange(12)[None]
    a, _ = GoldFinchModel(ck).forward(tokens)
    b, _ = load_model(case).forward(tokens)
    assert torch.allclose(a, b, atol=1e-6)  # same weights; BLAS may round differently by alignment


def test_casts_once_to_requested_dtype():
    ck = load_checkpoint(CONFORMANCE_DIR / "goldfinch_l6_d128", dtype=torch.bfloat16)
    assert {t.dtype for t in ck.weights.values()} == {torch.bfloat16}


@pytest.mark.parametrize("tamper,expected", [
    (lambda sd: sd.pop("blocks.1.att.key.weight"), "missing tensor 'blocks.1.att.key.weight'"),
    (lambda sd: sd.__setitem__("blocks.2.att.bogus", torch.zeros(3)), "unexpected tensor 'blocks.2.att.bogus'"),
    (lambda sd: sd.__setitem__("blocks.4.att.query.weight", torch.zeros(128, 64)),
     r"tensor 'blocks.4.att.query.weight' has shape \(128, 64\), expected \(128, 128\)"),
    (lambda sd: sd.pop("emb.weight"), "missing tensor 'emb.weight'"),
])
def test_bad_checkpoint_names_the_key(tmp_path, tamper, expected):
    sd = _state_dict("goldfinch_l6_d128")
    tamper(sd)
    torch.save(sd, tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(tmp_path)


def test_missing_path_and_ambiguous_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="exactly one weights file"):
        load_checkpoint(tmp_path)


def test_infer_config_from_shapes_only():
    shapes = {k: tuple(v.shape) for k, v in _state_dict("goldfinch_upgrade_l6_d256").items()}
    cfg = infer_config(shapes)
    assert (cfg.n_layer, cfg.n_embd, cfg.gold_start, cfg.tmix, cfg.use_v2) == (6, 256, 5, "x060", False)
