"""The decode step's batched arithmetic (engine.decode_ops, the all-layers GOLD keys/values, the
stacked projection weights, the one-copy working-set write) against the per-layer originals."""
from __future__ import annotations

import copy

import pytest
import torch

import test_decode_step as static_step
from conftest import CONFORMANCE_DIR, load_model
from engine import decode_fused
from engine import decode_ops as D
from engine import layers as L
from engine.config import TMIX_FINCH
from engine.kv_working_set import PagedKVPool
from engine.loader import load_checkpoint
from engine.model import GoldFinchModel

CASES = ["goldfinch_l6_d128", "goldfinch_rope_l6_d128", "goldfinch_upgrade_l6_d256"]
BELOW_AND_ABOVE = [1, 3, D.SMALL_BATCH, D.SMALL_BATCH + 1, 20]
TOL = 1e-5


def rows(B: int, C: int, seed: int) -> torch.Tensor:
    return torch.randn(B, C, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        assert a is None and b is None
        return 0.0
    assert a.shape == b.shape and a.dtype == b.dtype
    return (a - b).abs().max().item()


def merged_lora(model, layer: int):
    cfg = model.config
    return D.DecayValue2Lora.merge(model.blocks[layer]) if cfg.tmix != TMIX_FINCH and cfg.use_v2 else None


@pytest.mark.parametrize("B", [1, 3, 20])
@pytest.mark.parametrize("case", CASES)
def test_all_layers_keys_values_equal_per_layer(case, B):
    model = load_model(case)
    cfg = model.config
    gold = [model.blocks[i] for i in range(cfg.gold_start, cfg.n_layer)]
    k, k_prev, xo, xo_prev = (L.rms_norm(rows(B, cfg.n_embd, seed)) for seed in range(4))
    keys, values = D.gold_keys_values_rows_all_layers(k, k_prev, xo, xo_prev, D.GoldKVWeights.stack(gold))
    assert keys.shape == values.shape == (cfg.n_gold, B, cfg.dim_att)
    for j, w in enumerate(gold):
        keys_j, values_j = L.gold_keys_values_rows(k, k_prev, xo, xo_prev, w)
        assert max_diff(keys[j], keys_j) < TOL and max_diff(values[j], values_j) < TOL


@pytest.mark.parametrize("B", BELOW_AND_ABOVE)
@pytest.mark.parametrize("case", CASES)
def test_stacked_time_mix_equals_separate_products(case, B):
    model = load_model(case)
    cfg = model.config
    for layer in range(cfg.n_finch):
        w = model.blocks[layer]
        x, prev = rows(B, cfg.n_embd, layer), rows(B, cfg.n_embd, 100 + layer)
        stacked = D.finch_tmix_in_stacked(x, prev, w, merged_lora(model, layer), cfg)
        separate = L.finch_tmix_in(x, prev, w, cfg)
        for name, a, b in zip(("xa", "r", "k", "v", "log_decay", "u", "extra"), stacked, separate):
            assert max_diff(a, b) < TOL, (layer, name)
        r = stacked[1]  # the diagonal-block product leaves r a strided view of the wide output
        assert (r.stride(0) != r.shape[1]) == (B <= D.SMALL_BATCH)


@pytest.mark.parametrize("B", BELOW_AND_ABOVE)
@pytest.mark.parametrize("case", CASES)
def test_stacked_channel_mix_equals_separate_products(case, B):
    model = load_model(case)
    cfg = model.config
    for layer, w in enumerate(model.blocks):  # Finch and GOLD blocks alike
        x, xf, prev = (rows(B, cfg.n_embd, 3 * layer + i) for i in range(3))
        stacked = D.channel_mix_residual_stacked(x, xf, prev, w, cfg)
        assert max_diff(stacked, L.channel_mix_residual(x, xf, prev, w)) < TOL, layer


@pytest.mark.parametrize("B", BELOW_AND_ABOVE)
def test_stacked_products_read_each_weight_block(B):
    stacked = torch.randn(7 + 5, 6, generator=torch.Generator().manual_seed(1))
    a, b, c = (rows(B, 6, seed) for seed in range(3))
    out = D.stacked_products([((a,), (0, 7)), ((b, c), (7, 12))], stacked)
    for got, x, (lo, hi) in zip(out, (a, b, c), ((0, 7), (7, 12), (7, 12))):
        assert max_diff(got, x @ stacked[lo:hi].T) < TOL


def _storage_span(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


@pytest.mark.parametrize("case", CASES)
def test_stacked_weights_are_views_and_outputs_unchanged(case, monkeypatch):
    checkpoint = load_checkpoint(CONFORMANCE_DIR / case)
    original = copy.deepcopy(checkpoint.weights)
    model = GoldFinchModel(checkpoint)
    cfg = model.config
    for i, block in enumerate(model.blocks):
        stacks = [(L.CMIX_STACKED, L.CMIX_STACKED_NAMES)]
        if i < cfg.gold_start:
            stacks.append((L.TMIX_STACKED, L.tmix_stacked_names(cfg)))
        for stacked_name, names in stacks:
            stacked = block[stacked_name]
            start, end = _storage_span(stacked)
            assert stacked.shape[0] >= sum(original[f"blocks.{i}.{n}"].shape[0] for n in names)
            offset = start
            for n in names:
                view, key = block[n], f"blocks.{i}.{n}"
                assert view.is_contiguous() and _storage_span(view)[0] == offset and _storage_span(view)[1] <= end
                assert checkpoint.weights[key] is view  # the originals are no longer referenced
                assert torch.equal(view, original[key])
                offset = _storage_span(view)[1]
            if stacked_name == L.TMIX_STACKED and decode_fused.supported(cfg):  # then the fused decode's LoRA rows
                lora_rows = decode_fused.front_lora_rows(block, cfg)
                assert tuple(lora_rows) == decode_fused.FRONT_LORA_ROWS[:len(lora_rows)]
                assert torch.equal(stacked[-sum(t.shape[0] for t in lora_rows.values()):], torch.cat(list(lora_rows.values())))
                offset += sum(t.numel() * t.element_size() for t in lora_rows.values())
            assert offset == end
    tokens = torch.arange(12)[None] * 7 % cfg.vocab_size
    stacked_logits, _ = model.forward(tokens, all_logits=True)
    monkeypatch.setattr(GoldFinchModel, "_stack_projections", lambda self, weights: None)
    unstacked = GoldFinchModel(load_checkpoint(CONFORMANCE_DIR / case))
    assert L.TMIX_STACKED not in unstacked.blocks[0]
    unstacked_logits, _ = unstacked.forward(tokens, all_logits=True)
    assert (stacked_logits - unstacked_logits).abs().max() < 1e-6  # BLAS may round by alignment


def test_write_all_layers_writes_exactly_the_given_slots():
    n_gold, width = 3, 8
    pool = PagedKVPool(n_gold, num_pages=4, page_size=4, width=width, dtype=torch.float32, device="cpu")
    per_layer = PagedKVPool(n_gold, num_pages=4, page_size=4, width=width, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(0)
    for p in (pool, per_layer):
        p.keys.copy_(torch.randn(p.keys.shape, generator=torch.Generator().manual_seed(1)))
        p.values.copy_(torch.randn(p.values.shape, generator=torch.Generator().manual_seed(2)))
    keys_before, values_before = pool.keys.clone(), pool.values.clone()
    slots = torch.tensor([5, 0, 13, 19])  # 19: the scratch page's last row
    keys, values = torch.randn(n_gold, 4, width, generator=g), torch.randn(n_gold, 4, width, generator=g)
    pool.write_all_layers(slots, keys, values)
    for j in range(n_gold):
        per_layer.write(j, slots, keys[j], values[j])
    assert torch.equal(pool.keys, per_layer.keys) and torch.equal(pool.values, per_layer.values)
    flat = lambda t: t.view(n_gold, -1, width)  # noqa: E731
    written = torch.zeros(flat(pool.keys).shape[1], dtype=torch.bool)
    written[slots] = True
    assert torch.equal(flat(pool.keys)[:, slots], keys) and torch.equal(flat(pool.values)[:, slots], values)
    assert torch.equal(flat(pool.keys)[:, ~written], flat(keys_before)[:, ~written])
    assert torch.equal(flat(pool.values)[:, ~written], flat(values_before)[:, ~written])


@pytest.mark.parametrize("case", CASES)
def test_static_step_with_separate_products_equals_general_step(case, monkeypatch):
    """The whole static step above the stacked-product threshold (every product separate)."""
    monkeypatch.setattr(D, "SMALL_BATCH", 0)
    static_step.test_padded_static_step_equals_general_step(case, monkeypatch)
