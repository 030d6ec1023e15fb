"""PagedKeyCache / PagedKeyCacheView: exact round trips against the unpaged cache, CoW copies,
host export/import, sizing, and the whole model run paged vs. unpaged."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.block_manager import CachePool
from engine.kv_pool import PagedKeyCache, PagedKeyCacheView, slot_mapping
from engine.state import ContiguousKeyCache

CC = 8
ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = next((p for p in (ROOT / "shared", ROOT.parent / "shared")
                   if (p / "conformance" / "goldfinch_l6_d128").is_dir()), ROOT / "shared") \
    / "conformance" / "goldfinch_l6_d128"


@dataclass(eq=False)
class Owner:
    block_table: list[int] = field(default_factory=list)
    state_slot: int | None = None
    num_computed_tokens: int = 0


def step_view(pool: CachePool, cache: PagedKeyCache, owners: list[Owner],
              query_lens: list[int]) -> PagedKeyCacheView:
    """What the runner does before a step: grow tables, do CoW copies, build the view."""
    for o, q in zip(owners, query_lens):
        cache.copy_blocks(pool.ensure_capacity(o, o.num_computed_tokens + q))
    return PagedKeyCacheView(cache, [o.block_table for o in owners],
                             [o.num_computed_tokens for o in owners], query_lens)


def random_tokens(gen: torch.Generator, n: int, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, CC, generator=gen).to(dtype), torch.randint(0, 1000, (n,), generator=gen)


def test_slot_mapping_exact() -> None:
    assert slot_mapping([[2, 0], [1]], [3, 1], [2, 2], 4).tolist() == [11, 0, 5, 6]
    assert slot_mapping([], [], [], 4).tolist() == []
    # long chunks take the numpy path: the same slots as the per-token formula
    table, bs = [7, 3, 9, 0, 5, 2, 8, 1], 64
    long = slot_mapping([table, [4, 6]], [100, 3], [400, 5], bs).tolist()
    assert long == [table[p // bs] * bs + p % bs for p in range(100, 500)] + [4 * 64 + 3, 4 * 64 + 4, 4 * 64 + 5,
                                                                            4 * 64 + 6, 4 * 64 + 7]
    # short runs before and after a long one keep their order
    mixed = slot_mapping([[1], table, [2]], [0, 0, 5], [2, 300, 1], bs).tolist()
    assert mixed == [64, 65] + [table[p // bs] * bs + p % bs for p in range(300)] + [2 * 64 + 5]
    with pytest.raises(ValueError, match="sequence 1: 1 blocks of 4 cannot hold 5 tokens"):
        slot_mapping([[2, 0], [1]], [3, 1], [2, 4], 4)


def test_round_trip_matches_unpaged_cache() -> None:
    """3 sequences, prefill chunks then single-token steps, interleaved (non-contiguous) blocks."""
    gen = torch.Generator().manual_seed(0)
    pool, cache = CachePool(16, 4, 3), PagedKeyCache(16, 4, CC, torch.bfloat16)
    ref = ContiguousKeyCache(SimpleNamespace(compressed_dim=CC), 3, torch.bfloat16)
    owners = [Owner() for _ in range(3)]
    for q in [[5, 3, 7], [3, 6, 2], [1, 1, 1], [1, 1, 1], [1, 1, 1]]:
        view = step_view(pool, cache, owners, q)
        keys, ids = random_tokens(gen, sum(q))
        ref.set_step_lens(q)
        for v in (view, ref):
            v.write(keys, ids)
        for i, o in enumerate(owners):
            got, want = view.read(i), ref.read(i)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            assert got[1].dtype == torch.int32 and got[0].shape == (o.num_computed_tokens + q[i], CC)
            o.num_computed_tokens += q[i]
    assert [o.block_table for o in owners] == [[0, 1, 8], [2, 5, 6], [3, 4, 7]]
    pool.check_integrity(owners)


def test_read_before_write_is_refused() -> None:
    cache = PagedKeyCache(2, 4, CC, torch.float32)
    view = PagedKeyCacheView(cache, [[0]], [0], [2])
    with pytest.raises(RuntimeError, match="read before"):
        view.read(0)


def test_copy_on_write_copies_data() -> None:
    gen = torch.Generator().manual_seed(1)
    pool, cache = CachePool(8, 4, 0), PagedKeyCache(8, 4, CC, torch.float32)
    parent = Owner()
    keys, ids = random_tokens(gen, 6, torch.float32)
    step_view(pool, cache, [parent], [6]).write(keys, ids)
    parent.num_computed_tokens = 6
    child = Owner(num_computed_tokens=6)
    pool.fork(parent, child)
    views = {}
    for o in (child, parent):  # the child copies block 1 into block 2; the parent keeps block 1
        views[id(o)] = step_view(pool, cache, [o], [1])
        views[id(o)].write(*random_tokens(gen, 1, torch.float32))
    assert child.block_table == [0, 2] and parent.block_table == [0, 1]
    (ck, cid), (pk, pid) = views[id(child)].read(0), views[id(parent)].read(0)
    assert torch.equal(ck[:6], keys) and torch.equal(pk[:6], keys)
    assert torch.equal(cid[:6], ids.to(torch.int32)) and torch.equal(pid[:6], ids.to(torch.int32))
    assert not torch.equal(ck[6], pk[6])


def test_export_import_round_trip_into_other_blocks() -> None:
    gen = torch.Generator().manual_seed(2)
    pool, cache = CachePool(8, 4, 1), PagedKeyCache(8, 4, CC, torch.bfloat16)
    seq = Owner()
    keys, ids = random_tokens(gen, 10)
    step_view(pool, cache, [seq], [10]).write(keys, ids)
    seq.num_computed_tokens = 10
    old_table = list(seq.block_table)
    host_keys, host_ids = cache.export(seq.block_table, 10)
    assert host_keys.device.type == "cpu" and torch.equal(host_keys, keys)
    pool.release_to_host(seq)
    other = Owner()
    pool.ensure_capacity(other, 8)  # takes blocks 3, 4 so the sequence comes back elsewhere
    cache.write(torch.arange(12, 20), *random_tokens(gen, 8))
    pool.ensure_capacity(seq, 10)
    assert old_table == [0, 1, 2] and seq.block_table == [5, 6, 7]
    cache.import_(seq.block_table, host_keys, host_ids)
    got_keys, got_ids = cache.read(seq.block_table, 10)
    assert torch.equal(got_keys, keys) and torch.equal(got_ids, ids.to(torch.int32))
    pool.check_integrity([seq, other])


def test_read_rejects_short_table() -> None:
    cache = PagedKeyCache(4, 4, CC, torch.float32)
    with pytest.raises(ValueError, match="2 blocks of 4 cannot hold 9 tokens"):
        cache.read([0, 1], 9)


def test_bytes_per_token_and_budget() -> None:
    bf16, fp32 = PagedKeyCache(4, 16, 8, torch.bfloat16), PagedKeyCache(4, 16, 8, torch.float32)
    assert bf16.persistent_bytes_per_token() == 8 * 2 + 4 == 20
    assert fp32.persistent_bytes_per_token() == 8 * 4 + 4 == 36
    assert bf16.total_bytes() == 4 * 16 * 20 and fp32.total_bytes() == 4 * 16 * 36
    assert bf16.compressed_keys.shape == (4, 16, 8) and bf16.token_ids.dtype == torch.int32
    assert PagedKeyCache.num_blocks_for_budget(10 * 16 * 20 + 319, 16, 8, torch.bfloat16) == 10
    assert PagedKeyCache.num_blocks_for_budget(10 * 16 * 20 + 320, 16, 8, torch.bfloat16) == 11
    assert PagedKeyCache.num_blocks_for_budget(10 * 16 * 36, 16, 8, torch.float32) == 10
    assert PagedKeyCache.num_blocks_for_budget(0, 16, 8, torch.float32) == 0


def test_copy_blocks_moves_whole_blocks() -> None:
    cache = PagedKeyCache(4, 2, CC, torch.float32)
    cache.compressed_keys.copy_(torch.arange(4 * 2 * CC, dtype=torch.float32).view(4, 2, CC))
    cache.token_ids.copy_(torch.arange(8, dtype=torch.int32).view(4, 2))
    cache.copy_blocks([(0, 3), (1, 2)])
    assert cache.token_ids.tolist() == [[0, 1], [2, 3], [2, 3], [0, 1]]
    assert torch.equal(cache.compressed_keys[3], cache.compressed_keys[0])
    cache.copy_blocks([])


# ---- the model, paged vs. unpaged ---------------------------------------------------------------
@pytest.mark.skipif(not CHECKPOINT.is_dir(), reason=f"conformance checkpoint not found at {CHECKPOINT}")
def test_model_paged_matches_unpaged() -> None:
    from engine.loader import load_checkpoint
    from engine.model import GoldFinchModel, StepBatch
    from engine.state import RNNStatePool

    model = GoldFinchModel(load_checkpoint(CHECKPOINT, dtype=torch.float32))
    gen = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=gen) for n in (11, 7)]
    chunks = [(6, 5), (3, 4)]
    decode = torch.randint(0, vocab, (5, 2), generator=gen)

    per_seq = []  # each sequence alone on the plain path, same chunking
    for i, prompt in enumerate(prompts):
        state, out = None, []
        for piece in torch.split(prompt, list(chunks[i])):
            logits, state = model.forward(piece[None], state)
            out.append(logits[0])
        for t in decode[:, i]:
            logits, state = model.forward(t.view(1, 1), state)
            out.append(logits[0])
        per_seq.append(out)
    expected = [torch.stack(pair) for pair in zip(*per_seq)]  # per step, [2, V]

    slots = torch.tensor([3, 1])
    rnn = RNNStatePool.allocate(model.config, 5, torch.float32)
    for t in (rnn.wkv, rnn.tmix_shift, rnn.cmix_shift):
        t.normal_(generator=gen)  # the other slots hold garbage that must not leak in
    for s in slots.tolist():
        rnn.reset(s)
    pool = CachePool(16, 4, 5)
    cache = PagedKeyCache(16, 4, model.config.compressed_dim, torch.float32)
    owners = [Owner(), Owner()]
    feeds = [[prompts[i][:chunks[i][0]] for i in range(2)], [prompts[i][chunks[i][0]:] for i in range(2)]]
    feeds += [[decode[k, 0:1], decode[k, 1:2]] for k in range(5)]
    for step, feed in enumerate(feeds):
        q = [len(f) for f in feed]
        view = step_view(pool, cache, owners, q)
        batch = StepBatch(token_ids=torch.cat(feed), query_lens=tuple(q),
                          context_lens=tuple(o.num_computed_tokens for o in owners), state_slots=slots)
        logits = model.step(batch, rnn, view)
        for o, n in zip(owners, q):
            o.num_computed_tokens += n
        assert torch.allclose(logits, expected[step], atol=1e-5), f"step {step}"
    assert [o.block_table for o in owners] == [[0, 1, 3, 5], [2, 4, 6]]
    pool.check_integrity(owners)
