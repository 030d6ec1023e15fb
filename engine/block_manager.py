"""Bookkeeping of the paged compressed-key pool and the RNN state slots (no tensors here).

GoldFinch's attention layers all read one compressed key cache, so a sequence owns exactly one
block table (positions -> blocks of `block_size` tokens) and one RNN state slot. `CachePool` is
the only code that changes an owner's `block_table` and `state_slot`; the tensors live in
`engine.kv_pool.PagedKeyCache`, which performs the block copies this class asks for.

Determinism (tests assert exact ids): free blocks and free slots are FIFO queues initialised
0..n-1. Allocation pops from the FRONT; a released block or slot is appended to the BACK, blocks
in the order of the owner's table. So a fresh pool hands out 0, 1, 2, ... and ids freed earlier
are reused before ids freed later.

Sharing: `fork` lets several owners reference the same blocks (n > 1 samples of one prompt, a
session's history). A block is written only while its reference count is 1; `ensure_capacity`
replaces a shared block before a write lands in it (copy-on-write).
"""
from __future__ import annotations

from collections import Counter, deque
from typing import Iterable, Protocol


class PoolExhausted(RuntimeError):
    """Not enough free blocks or slots; the pool is left exactly as it was."""


class CacheOwner(Protocol):
    """Anything that holds cache resources: a running sequence, a session, a forked sample."""

    block_table: list[int]
    state_slot: int | None
    num_computed_tokens: int


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class CachePool:
    """Free lists and reference counts for `num_blocks` key blocks and `num_slots` state slots."""

    def __init__(self, num_blocks: int, block_size: int, num_slots: int) -> None:
        if num_blocks < 0 or num_slots < 0 or block_size < 1:
            raise ValueError(f"need num_blocks >= 0, block_size >= 1, num_slots >= 0; got "
                             f"{num_blocks}, {block_size}, {num_slots}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_slots = num_slots
        self._free_blocks: deque[int] = deque(range(num_blocks))
        self._ref_counts: list[int] = [0] * num_blocks
        self._free_slots: deque[int] = deque(range(num_slots))
        self._used_slots: set[int] = set()

    # ---- counters ------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free_blocks)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def num_used_slots(self) -> int:
        return self.num_slots - len(self._free_slots)

    @property
    def tokens_capacity(self) -> int:
        return self.num_blocks * self.block_size

    def usage(self) -> float:
        """Fraction of blocks in use (0.0 for an empty pool), for metrics and admission."""
        return self.num_used_blocks / self.num_blocks if self.num_blocks else 0.0

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    # ---- blocks ----------------------------------------------------------------------------------
    def _cow_indices(self, owner: CacheOwner, num_tokens: int) -> list[int]:
        """Table indices of shared blocks that positions [num_computed, num_tokens) would write.

        The first may hold this owner's earlier tokens (copy needed); any later one only holds
        another owner's future tokens (replace without copying), e.g. after a fork of an owner
        whose table had been grown ahead of its computed tokens."""
        start = owner.num_computed_tokens
        if num_tokens <= start:
            return []
        first, end = start // self.block_size, min(_ceil_div(num_tokens, self.block_size),
                                                   len(owner.block_table))
        return [j for j in range(first, end) if self._ref_counts[owner.block_table[j]] > 1]

    def blocks_needed(self, owner: CacheOwner, num_tokens: int) -> int:
        """New blocks required so positions [0, num_tokens) are backed and writable: table growth
        plus one per shared block the coming writes land in (copy-on-write)."""
        grow = max(0, _ceil_div(num_tokens, self.block_size) - len(owner.block_table))
        return grow + len(self._cow_indices(owner, num_tokens))

    def is_ready(self, owner: CacheOwner, num_tokens: int) -> bool:
        """Positions [0, num_tokens) are backed and every block the coming writes land in is
        unshared: nothing to allocate or copy (a decoding sequence, most steps; checked per
        sequence per step, so kept to a table length and a reference count or two)."""
        table, bs = owner.block_table, self.block_size
        if len(table) * bs < num_tokens:
            return False
        start = owner.num_computed_tokens
        refs = self._ref_counts
        return all(refs[table[j]] == 1 for j in range(start // bs, _ceil_div(num_tokens, bs))) if num_tokens > start else True

    def can_allocate(self, owner: CacheOwner, num_tokens: int) -> bool:
        return self.blocks_needed(owner, num_tokens) <= len(self._free_blocks)

    def ensure_capacity(self, owner: CacheOwner, num_tokens: int) -> list[tuple[int, int]]:
        """Makes positions [0, num_tokens) backed and writable for `owner`.

        Returns the (src, dst) block copies the caller must perform on the tensors before the
        write: a shared, partially filled block holding this owner's earlier tokens is copied
        into a private block. Raises `PoolExhausted` with nothing changed if blocks are short."""
        needed = self.blocks_needed(owner, num_tokens)
        if needed > len(self._free_blocks):
            raise PoolExhausted(f"{needed} blocks needed for {num_tokens} tokens, "
                                f"{len(self._free_blocks)} free")
        copies: list[tuple[int, int]] = []
        table = owner.block_table
        for j in self._cow_indices(owner, num_tokens):
            old, new = table[j], self._take_block()
            self._ref_counts[old] -= 1  # shared, so it stays > 0 and is never freed here
            table[j] = new
            if j * self.block_size < owner.num_computed_tokens:
                copies.append((old, new))
        while len(table) < _ceil_div(num_tokens, self.block_size):
            table.append(self._take_block())
        return copies

    def _take_block(self) -> int:
        block = self._free_blocks.popleft()
        self._ref_counts[block] = 1
        return block

    def fork(self, parent: CacheOwner, child: CacheOwner) -> None:
        """Gives `child` the parent's blocks, shared (refcounts + 1); copy-on-write keeps them
        apart later. The slot is not shared: allocate the child's own and copy the RNN state.
        The caller sets the child's `num_computed_tokens` (the parent's, for n > 1 samples)."""
        if child.block_table:
            raise ValueError(f"fork: child already holds {len(child.block_table)} blocks")
        for block in parent.block_table:
            self._ref_counts[block] += 1
        child.block_table = list(parent.block_table)

    def free_blocks(self, owner: CacheOwner) -> None:
        """Drops the owner's references; blocks nobody references go to the back of the free
        queue in table order. Idempotent: the owner's table is emptied."""
        table, owner.block_table = owner.block_table, []
        for block in table:
            if self._ref_counts[block] <= 0:
                raise ValueError(f"free_blocks: block {block} is not in use")
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free_blocks.append(block)

    # ---- slots -----------------------------------------------------------------------------------
    def allocate_slot(self, owner: CacheOwner) -> int:
        """Takes the front free slot for `owner`; an owner holds at most one."""
        if owner.state_slot is not None:
            raise ValueError(f"allocate_slot: owner already holds slot {owner.state_slot}")
        if not self._free_slots:
            raise PoolExhausted(f"no free state slot (all {self.num_slots} in use)")
        slot = self._free_slots.popleft()
        self._used_slots.add(slot)
        owner.state_slot = slot
        return slot

    def free_slot(self, owner: CacheOwner) -> None:
        """Returns the owner's slot to the back of the free queue. Idempotent."""
        slot = owner.state_slot
        if slot is None:
            return
        if slot not in self._used_slots:
            raise ValueError(f"free_slot: slot {slot} is not in use")
        self._used_slots.remove(slot)
        self._free_slots.append(slot)
        owner.state_slot = None

    # ---- whole owners ------------------------------------------------------------------------------
    def free(self, owner: CacheOwner) -> None:
        """Releases everything the owner holds (finished or aborted). Idempotent."""
        self.free_blocks(owner)
        self.free_slot(owner)

    def release_to_host(self, owner: CacheOwner) -> None:
        """Preemption / session park: the caller has already exported the keys and the RNN state
        to host memory; the device blocks and the slot are released. Idempotent."""
        self.free(owner)

    # ---- integrity -----------------------------------------------------------------------------------
    def check_integrity(self, owners: Iterable[CacheOwner]) -> None:
        """Verifies the free lists, refcounts and slots against ALL owners holding resources;
        raises AssertionError naming the first inconsistency. For tests and debug builds.
        An owner with neither blocks nor slot (released to host) skips the table-length rule."""
        owners = list(owners)
        if len({id(o) for o in owners}) != len(owners):
            raise AssertionError("check_integrity: an owner is listed twice")
        self._check_free_list("block", self._free_blocks, self.num_blocks)
        self._check_free_list("slot", self._free_slots, self.num_slots)
        self._check_refcounts(owners)
        self._check_slots(owners)
        for n, o in enumerate(owners):
            if not o.block_table and o.state_slot is None:
                continue  # not on the device (released to host): its tokens live elsewhere
            need = _ceil_div(o.num_computed_tokens, self.block_size)
            if len(o.block_table) < need:
                raise AssertionError(f"owner #{n}: table has {len(o.block_table)} blocks, its "
                                     f"{o.num_computed_tokens} computed tokens need {need}")

    @staticmethod
    def _check_free_list(kind: str, free: Iterable[int], total: int) -> None:
        seen: set[int] = set()
        for i in free:
            if not 0 <= i < total:
                raise AssertionError(f"free {kind} list holds {i}, out of range [0, {total})")
            if i in seen:
                raise AssertionError(f"free {kind} list holds {i} twice")
            seen.add(i)

    def _check_refcounts(self, owners: list[CacheOwner]) -> None:
        if len(self._ref_counts) != self.num_blocks:
            raise AssertionError(f"{len(self._ref_counts)} refcounts for {self.num_blocks} blocks")
        uses: Counter[int] = Counter()
        for n, o in enumerate(owners):
            for b in o.block_table:
                if not (isinstance(b, int) and 0 <= b < self.num_blocks):
                    raise AssertionError(f"owner #{n}: block id {b!r} out of range [0, {self.num_blocks})")
                uses[b] += 1
        free = set(self._free_blocks)
        for b, rc in enumerate(self._ref_counts):
            if rc != uses[b]:
                raise AssertionError(f"block {b}: refcount {rc} but {uses[b]} table references")
            if (rc == 0) != (b in free):
                state = "free" if b in free else "not free"
                raise AssertionError(f"block {b}: refcount {rc} but {state}")

    def _check_slots(self, owners: list[CacheOwner]) -> None:
        free = set(self._free_slots)
        bad = sorted(s for s in self._used_slots if not 0 <= s < self.num_slots)
        if bad:
            raise AssertionError(f"used slots out of range [0, {self.num_slots}): {bad}")
        if free & self._used_slots:
            raise AssertionError(f"slots both free and used: {sorted(free & self._used_slots)}")
        if len(free) + len(self._used_slots) != self.num_slots:
            missing = sorted(set(range(self.num_slots)) - free - self._used_slots)
            raise AssertionError(f"slots neither free nor used: {missing}")
        holder: dict[int, int] = {}
        for n, o in enumerate(owners):
            s = o.state_slot
            if s is None:
                continue
            if s not in self._used_slots:
                raise AssertionError(f"owner #{n}: slot {s} is not marked used")
            if s in holder:
                raise AssertionError(f"slot {s} owned by owners #{holder[s]} and #{n}")
            holder[s] = n
        leaked = sorted(self._used_slots - holder.keys())
        if leaked:
            raise AssertionError(f"slots used by no owner: {leaked}")
