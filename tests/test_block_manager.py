"""CachePool bookkeeping: exact block/slot ids, copy-on-write, exhaustion, integrity checks."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from engine.block_manager import CachePool, PoolExhausted


@dataclass(eq=False)
class Owner:
    block_table: list[int] = field(default_factory=list)
    state_slot: int | None = None
    num_computed_tokens: int = 0


def grown(pool: CachePool, computed: int, tokens: int) -> Owner:
    """An owner that has computed `computed` tokens with capacity for `tokens`."""
    o = Owner()
    assert pool.ensure_capacity(o, tokens) == []
    o.num_computed_tokens = computed
    return o


def free_order(pool: CachePool) -> list[int]:
    return list(pool._free_blocks)


# ---- allocation order ------------------------------------------------------------------------------
def test_fresh_pool_counters() -> None:
    pool = CachePool(num_blocks=8, block_size=4, num_slots=3)
    assert (pool.num_free_blocks, pool.num_used_blocks, pool.num_free_slots, pool.num_used_slots) == (8, 0, 3, 0)
    assert pool.tokens_capacity == 32 and pool.usage() == 0.0
    assert CachePool(0, 4, 0).usage() == 0.0
    with pytest.raises(ValueError):
        CachePool(4, 0, 1)


def test_blocks_needed_counts_growth() -> None:
    pool = CachePool(8, 4, 1)
    o = Owner()
    assert [pool.blocks_needed(o, n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    pool.ensure_capacity(o, 4)
    assert [pool.blocks_needed(o, n) for n in (3, 4, 5, 12)] == [0, 0, 1, 2]
    assert pool.can_allocate(o, 32) and not pool.can_allocate(o, 33)


def test_allocate_grow_free_reallocate_exact_ids() -> None:
    pool = CachePool(8, 4, 2)
    a, b = Owner(), Owner()
    assert pool.ensure_capacity(a, 10) == [] and a.block_table == [0, 1, 2]
    assert pool.ensure_capacity(b, 4) == [] and b.block_table == [3]
    a.num_computed_tokens = 10
    pool.ensure_capacity(a, 13)
    assert a.block_table == [0, 1, 2, 4]
    pool.ensure_capacity(a, 16)  # still inside block 4
    assert a.block_table == [0, 1, 2, 4] and pool.num_used_blocks == 5 and pool.usage() == 5 / 8
    pool.free(a)
    assert a.block_table == [] and free_order(pool) == [5, 6, 7, 0, 1, 2, 4]
    c = Owner()
    pool.ensure_capacity(c, 20)
    assert c.block_table == [5, 6, 7, 0, 1]
    pool.free(b)
    pool.free(c)
    assert free_order(pool) == [2, 4, 3, 5, 6, 7, 0, 1]
    pool.check_integrity([a, b, c])


def test_exhaustion_leaves_state_unchanged() -> None:
    pool = CachePool(4, 4, 1)
    a = grown(pool, 12, 12)
    b = Owner()
    with pytest.raises(PoolExhausted, match="2 blocks needed for 8 tokens, 1 free"):
        pool.ensure_capacity(b, 8)
    assert b.block_table == [] and pool.num_free_blocks == 1 and free_order(pool) == [3]
    # copy-on-write + growth: needs 2, only 1 free -> nothing changes, not even the CoW part
    a.num_computed_tokens = 10
    child = Owner(num_computed_tokens=10)
    pool.fork(a, child)
    before = (list(a.block_table), list(child.block_table), list(pool._ref_counts), free_order(pool))
    assert pool.blocks_needed(child, 13) == 2
    with pytest.raises(PoolExhausted):
        pool.ensure_capacity(child, 13)
    assert (a.block_table, child.block_table, pool._ref_counts, free_order(pool)) == before
    pool.check_integrity([a, child])


# ---- fork and copy-on-write ------------------------------------------------------------------------
def test_fork_shares_blocks_not_slot() -> None:
    pool = CachePool(8, 4, 4)
    parent = grown(pool, 6, 6)
    pool.allocate_slot(parent)
    child = Owner(num_computed_tokens=6)
    pool.fork(parent, child)
    assert child.block_table == [0, 1] and child.block_table is not parent.block_table
    assert [pool.ref_count(b) for b in (0, 1)] == [2, 2] and pool.num_used_blocks == 2
    assert child.state_slot is None and pool.allocate_slot(child) == 1
    with pytest.raises(ValueError, match="already holds 2 blocks"):
        pool.fork(parent, child)
    pool.check_integrity([parent, child])


def test_copy_on_write_of_partial_block() -> None:
    pool = CachePool(8, 4, 0)
    parent = grown(pool, 6, 6)
    child = Owner(num_computed_tokens=6)
    pool.fork(parent, child)
    assert pool.blocks_needed(child, 7) == 1
    assert pool.ensure_capacity(child, 7) == [(1, 2)]
    assert child.block_table == [0, 2] and parent.block_table == [0, 1]
    assert [pool.ref_count(b) for b in (0, 1, 2)] == [2, 1, 1]
    # the parent is now the only holder of block 1: writes in place, no copy
    assert pool.blocks_needed(parent, 7) == 0 and pool.ensure_capacity(parent, 7) == []
    assert parent.block_table == [0, 1]
    pool.check_integrity([parent, child])


def test_fork_at_block_boundary_needs_no_copy() -> None:
    pool = CachePool(8, 4, 0)
    parent = grown(pool, 8, 8)
    child = Owner(num_computed_tokens=8)
    pool.fork(parent, child)
    assert pool.ensure_capacity(child, 9) == [] and child.block_table == [0, 1, 2]
    assert pool.ensure_capacity(parent, 9) == [] and parent.block_table == [0, 1, 3]
    assert [pool.ref_count(b) for b in range(4)] == [2, 2, 1, 1]
    pool.check_integrity([parent, child])


def test_is_ready_exactly_when_ensure_capacity_would_do_nothing() -> None:
    pool = CachePool(8, 4, 0)
    parent = grown(pool, 6, 6)
    assert pool.is_ready(parent, 6) and pool.is_ready(parent, 3)  # nothing new to write
    assert pool.is_ready(parent, 8) and not pool.is_ready(parent, 9)  # two blocks of four
    parent2 = grown(pool, 5, 8)
    assert pool.is_ready(parent2, 8) and not pool.is_ready(parent2, 9)
    child = Owner(num_computed_tokens=5)
    pool.fork(parent2, child)
    assert not pool.is_ready(child, 6) and not pool.is_ready(parent2, 6)  # the written block is shared
    assert pool.ensure_capacity(child, 6) == [(3, 4)]
    assert pool.is_ready(child, 6) and pool.is_ready(parent2, 6)  # each now holds its block alone
    for owner, n in ((parent, 6), (parent, 9), (parent2, 8), (parent2, 12), (child, 8)):
        assert pool.is_ready(owner, n) == (pool.blocks_needed(owner, n) == 0)
    pool.check_integrity([parent, parent2, child])


def test_fork_after_growing_ahead_replaces_every_shared_write_block() -> None:
    """The parent had room for 9 tokens but computed 5: both the partial block (copied) and
    the empty shared block after it (replaced, nothing to copy) must become private."""
    pool = CachePool(8, 4, 0)
    parent = grown(pool, 5, 9)
    child = Owner(num_computed_tokens=5)
    pool.fork(parent, child)
    assert pool.blocks_needed(child, 9) == 2
    assert pool.ensure_capacity(child, 9) == [(1, 3)]
    assert child.block_table == [0, 3, 4] and parent.block_table == [0, 1, 2]
    assert pool.ensure_capacity(parent, 9) == []
    pool.check_integrity([parent, child])


def test_three_samples_last_writer_keeps_block() -> None:
    pool = CachePool(8, 4, 0)
    parent = grown(pool, 6, 6)
    kids = [Owner(num_computed_tokens=6) for _ in range(2)]
    for k in kids:
        pool.fork(parent, k)
    assert pool.ref_count(1) == 3
    assert pool.ensure_capacity(kids[0], 7) == [(1, 2)]
    assert pool.ensure_capacity(kids[1], 7) == [(1, 3)]
    assert pool.ensure_capacity(parent, 7) == []
    assert [o.block_table for o in (parent, *kids)] == [[0, 1], [0, 2], [0, 3]]
    assert pool.ref_count(0) == 3 and pool.ref_count(1) == 1
    pool.free(parent)
    assert free_order(pool) == [4, 5, 6, 7, 1] and pool.ref_count(0) == 2
    pool.check_integrity(kids)


# ---- slots and freeing --------------------------------------------------------------------------------
def test_slots_exact_ids_and_exhaustion() -> None:
    pool = CachePool(4, 4, 3)
    a, b, c, d = Owner(), Owner(), Owner(), Owner()
    assert [pool.allocate_slot(o) for o in (a, b, c)] == [0, 1, 2]
    with pytest.raises(PoolExhausted, match="no free state slot"):
        pool.allocate_slot(d)
    assert d.state_slot is None and pool.num_used_slots == 3
    with pytest.raises(ValueError, match="already holds slot 0"):
        pool.allocate_slot(a)
    pool.free_slot(b)
    pool.free_slot(a)
    assert (a.state_slot, b.state_slot, pool.num_free_slots) == (None, None, 2)
    assert pool.allocate_slot(d) == 1 and pool.allocate_slot(a) == 0
    pool.check_integrity([a, b, c, d])


def test_idempotent_free_does_not_double_decrement() -> None:
    pool = CachePool(8, 4, 2)
    parent = grown(pool, 6, 6)
    child = Owner(num_computed_tokens=6)
    pool.fork(parent, child)
    pool.allocate_slot(child)
    pool.free(child)
    pool.free(child)
    pool.free_slot(child)
    pool.free_blocks(child)
    assert [pool.ref_count(b) for b in (0, 1)] == [1, 1] and pool.num_free_blocks == 6
    assert pool.num_free_slots == 2
    pool.check_integrity([parent, child])


def test_release_to_host_frees_blocks_and_slot() -> None:
    pool = CachePool(4, 4, 2)
    a = grown(pool, 7, 8)
    pool.allocate_slot(a)
    pool.release_to_host(a)
    pool.release_to_host(a)
    assert (a.block_table, a.state_slot) == ([], None)
    assert (pool.num_free_blocks, pool.num_free_slots) == (4, 2) and free_order(pool) == [2, 3, 0, 1]
    pool.check_integrity([a])  # its 7 computed tokens now live on the host: no table needed
    pool.ensure_capacity(a, 7)  # back on the device: needs its blocks again
    assert a.block_table == [2, 3]
    pool.check_integrity([a])


# ---- integrity -------------------------------------------------------------------------------------
def good_state() -> tuple[CachePool, list[Owner]]:
    pool = CachePool(8, 4, 3)
    a = grown(pool, 6, 6)
    b = Owner(num_computed_tokens=6)
    pool.fork(a, b)
    c = grown(pool, 3, 3)
    for o in (a, b, c):
        pool.allocate_slot(o)
    pool.check_integrity([a, b, c])
    return pool, [a, b, c]


@pytest.mark.parametrize("tamper, message", [
    (lambda p, o: p._free_blocks.append(3), "free block list holds 3 twice"),
    (lambda p, o: p._free_blocks.append(0), "block 0: refcount 2 but free"),
    (lambda p, o: p._free_blocks.append(99), r"free block list holds 99, out of range \[0, 8\)"),
    (lambda p, o: p._free_blocks.popleft(), "block 3: refcount 0 but not free"),
    (lambda p, o: p._ref_counts.__setitem__(1, 3), "block 1: refcount 3 but 2 table references"),
    (lambda p, o: o[2].block_table.append(2), "block 2: refcount 1 but 2 table references"),
    (lambda p, o: o[2].block_table.append(8), r"owner #2: block id 8 out of range \[0, 8\)"),
    (lambda p, o: o[2].block_table.append(-1), r"owner #2: block id -1 out of range"),
    (lambda p, o: setattr(o[1], "num_computed_tokens", 9), "owner #1: table has 2 blocks, its 9 computed tokens need 3"),
    (lambda p, o: setattr(o[1], "state_slot", 0), "slot 0 owned by owners #0 and #1"),
    (lambda p, o: setattr(o[1], "state_slot", None), r"slots used by no owner: \[1\]"),
    (lambda p, o: p._free_slots.append(2), r"slots both free and used: \[2\]"),
    (lambda p, o: (p._used_slots.discard(2), p._free_slots.append(2)), r"owner #2: slot 2 is not marked used"),
    (lambda p, o: p._used_slots.add(7), r"used slots out of range \[0, 3\): \[7\]"),
    (lambda p, o: (p._used_slots.discard(2), setattr(o[2], "state_slot", None)), r"slots neither free nor used: \[2\]"),
    (lambda p, o: o.append(o[0]), "an owner is listed twice"),
    (lambda p, o: o.pop(), "block 2: refcount 1 but 0 table references"),
])
def test_check_integrity_detects_corruption(tamper, message) -> None:
    pool, owners = good_state()
    tamper(pool, owners)
    with pytest.raises(AssertionError, match=message):
        pool.check_integrity(owners)


def test_free_slot_list_duplicate_detected() -> None:
    pool = CachePool(2, 4, 3)
    pool._free_slots.append(0)
    with pytest.raises(AssertionError, match="free slot list holds 0 twice"):
        pool.check_integrity([])


def test_random_operations_keep_integrity() -> None:
    """Random allocate / grow / fork / write / free sequences never corrupt the bookkeeping."""
    rng = random.Random(1234)
    pool = CachePool(24, 4, 6)
    owners: list[Owner] = []
    for _ in range(600):
        op = rng.random()
        if op < 0.2 and pool.num_free_slots:
            o = Owner()
            pool.allocate_slot(o)
            owners.append(o)
        elif op < 0.3 and owners and pool.num_free_slots:
            parent, child = rng.choice(owners), Owner()
            pool.fork(parent, child)
            child.num_computed_tokens = parent.num_computed_tokens
            pool.allocate_slot(child)
            owners.append(child)
        elif op < 0.8 and owners:
            o = rng.choice(owners)
            target = o.num_computed_tokens + rng.randint(1, 9)
            free_before = pool.num_free_blocks
            try:
                pool.ensure_capacity(o, target)
                o.num_computed_tokens = target
            except PoolExhausted:
                assert pool.num_free_blocks == free_before
        elif owners:
            o = owners.pop(rng.randrange(len(owners)))
            pool.free(o)
            pool.free(o)
        pool.check_integrity(owners)
        assert pool.num_free_blocks + pool.num_used_blocks == 24
