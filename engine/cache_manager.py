"""The cache pool as the scheduler sees it: bookkeeping (`CachePool`) and the tensors it governs
(`PagedKeyCache` for compressed keys, `RNNStatePool` for state slots), changed together.

Every change of an owner's block table or state slot goes through here, and every one of them
moves the data with it: growing (with copy-on-write of a shared block), forking, moving a
sequence's state to host memory and back, handing state between a sequence and a session.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .block_manager import CachePool, CacheOwner, PoolExhausted
from .config import ModelConfig
from .kv_pool import PagedKeyCache, PagedKeyCacheView
from .sequence import HostCopy
from .state import RNNStatePool

__all__ = ["CacheManager", "CacheConfig", "PoolExhausted"]


@dataclass(frozen=True)
class CacheConfig:
    num_blocks: int
    block_size: int
    num_slots: int

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "num_slots"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size


def num_blocks_for_tokens(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class CacheManager:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, dtype: torch.dtype,
                 device: str | torch.device) -> None:
        self.config = cache_config
        self.pool = CachePool(cache_config.num_blocks, cache_config.block_size, cache_config.num_slots)
        # one block and one slot past what the pool hands out: scratch for the padded rows of a
        # CUDA-graph decode batch, which must write somewhere that no sequence owns
        self.keys = PagedKeyCache(cache_config.num_blocks + 1, cache_config.block_size,
                                  model_config.compressed_dim, dtype, device)
        self.rnn = RNNStatePool.allocate(model_config, cache_config.num_slots + 1, dtype, device)
        self.scratch_key_slot = cache_config.num_blocks * cache_config.block_size
        self.scratch_state_slot = cache_config.num_slots
        # called with an owner whose device resources go (derived data kept for it, such as a K/V
        # working set, must go with them)
        self.on_release: list = []

    def _released(self, owner: CacheOwner) -> None:
        for callback in self.on_release:
            callback(owner)

    # ---- capacity ------------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.config.block_size

    def persistent_bytes_per_token(self) -> int:
        return self.keys.persistent_bytes_per_token()

    def is_ready(self, owner: CacheOwner, num_tokens: int) -> bool:
        return self.pool.is_ready(owner, num_tokens)

    def can_grow(self, owner: CacheOwner, num_tokens: int) -> bool:
        return self.pool.can_allocate(owner, num_tokens)

    # ---- owning and growing --------------------------------------------------------------------
    def admit(self, owner: CacheOwner) -> None:
        """Gives a new sequence a zeroed state slot (its key cache starts empty)."""
        slot = self.pool.allocate_slot(owner)
        self.rnn.reset(slot)

    def grow(self, owner: CacheOwner, num_tokens: int) -> None:
        """Backs positions [0, num_tokens) with blocks, copying a shared block before a write."""
        copies = self.pool.ensure_capacity(owner, num_tokens)
        if copies:
            self.keys.copy_blocks(copies)

    def fork(self, parent: CacheOwner, child: CacheOwner) -> None:
        """The child shares the parent's blocks and gets its own copy of the RNN state."""
        slot = self.pool.allocate_slot(child)
        try:
            self.pool.fork(parent, child)
        except Exception:
            self.pool.free_slot(child)
            raise
        self.rnn.copy_slot(parent.state_slot, slot)

    def free(self, owner: CacheOwner) -> None:
        self.pool.free(owner)
        self._released(owner)

    def transfer(self, src: CacheOwner, dst: CacheOwner) -> None:
        """Hands src's blocks and slot to dst (a finished sequence to its session and back) without
        copying: the pool's reference counts do not change."""
        if dst.block_table or dst.state_slot is not None:
            raise RuntimeError("transfer target already owns cache resources")
        dst.block_table, dst.state_slot = src.block_table, src.state_slot
        src.block_table, src.state_slot = [], None
        self._released(src)

    # ---- host memory ---------------------------------------------------------------------------
    def to_host(self, owner: CacheOwner, num_tokens: int) -> HostCopy:
        """Copies the owner's keys (first num_tokens) and RNN state to host memory and frees its
        blocks and slot."""
        compressed, ids = self.keys.export(owner.block_table, num_tokens)
        copy = HostCopy(compressed_keys=compressed, token_ids=ids, rnn_state=self.rnn.save(owner.state_slot))
        self.pool.release_to_host(owner)
        self._released(owner)
        return copy

    def host_copy_of(self, owner: CacheOwner, num_tokens: int) -> HostCopy:
        """Like to_host, but the owner keeps its device resources (forking under slot pressure)."""
        compressed, ids = self.keys.export(owner.block_table, num_tokens)
        return HostCopy(compressed_keys=compressed, token_ids=ids, rnn_state=self.rnn.save(owner.state_slot))

    def can_restore(self, num_tokens: int) -> bool:
        return (self.pool.num_free_slots >= 1
                and self.pool.num_free_blocks >= num_blocks_for_tokens(num_tokens, self.block_size))

    def from_host(self, owner: CacheOwner, copy: HostCopy) -> None:
        """Brings a host copy back into fresh blocks and a slot (raises PoolExhausted, changing
        nothing, when there is no room)."""
        n = copy.token_ids.shape[0]
        if not self.can_restore(n):
            raise PoolExhausted(f"no room to restore {n} tokens")
        slot = self.pool.allocate_slot(owner)
        self.pool.ensure_capacity(owner, n)
        if n:
            self.keys.import_(owner.block_table, copy.compressed_keys, copy.token_ids)
        self.rnn.load(slot, copy.rnn_state)

    # ---- a step's view -------------------------------------------------------------------------
    def step_view(self, owners: list[CacheOwner], context_lens: list[int], query_lens: list[int]) -> PagedKeyCacheView:
        return PagedKeyCacheView(self.keys, [o.block_table for o in owners], context_lens, query_lens)

    def check_integrity(self, owners) -> None:
        self.pool.check_integrity(owners)
