"""Engine configuration (frozen) and the sizing of the cache pool from it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache_manager import CacheConfig
from .kv_pool import PagedKeyCache
from .scheduler import SchedulerConfig

GiB = 1 << 30


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64  # running sequences (state slots) at once
    max_num_batched_tokens: int = 2048  # tokens per model step (decodes + prefill chunks)
    # tokens per step while no sequence decodes (0: max_num_batched_tokens; the server's default is
    # 8192): a prompt alone then runs in fewer, longer chunks (scheduler.SchedulerConfig)
    prefill_only_batched_tokens: int = 0
    max_model_len: int = 4096  # prompt + output tokens per sequence
    block_size: int = 16  # tokens per block of the compressed-key pool
    cache_tokens: int | None = None  # pool capacity in tokens; None: from cache_bytes / free memory
    cache_bytes: int | None = None  # pool budget in bytes (used when cache_tokens is None)
    gpu_memory_fraction: float = 0.5  # of free GPU memory for the pool, when neither is given
    cpu_cache_bytes: int = GiB // 8  # default pool budget on the CPU
    num_slots: int | None = None  # RNN state slots; default max_num_seqs
    session_host_bytes: int = 4 * GiB  # host memory for sessions moved off the device
    max_sessions: int = 10_000
    # materialised per-layer K/V for running sequences (64 KB/token at the 1.5B shape); None: 60% of
    # the GPU memory left after the pool, 256 MiB on the CPU; 0: always derive from the compressed cache
    kv_working_set_bytes: int | None = None
    kv_working_set_page_size: int = 64  # tokens per working-set page (one attention tile)
    # decode steps over complete working sets run a static step (engine.decode_step), replayed from
    # CUDA graphs on a GPU (captured at start for batch sizes up to max_num_seqs)
    decode_fast_path: bool = True
    cuda_graphs: bool = True
    # a step of one sequence's prompt chunk (up to the larger budget, at most 8K tokens) replays
    # its Finch layers from a CUDA graph per chunk-length bucket (engine.prefill_graphs), on a GPU
    prefill_graphs: bool = True
    # launch a decode step before reading the previous one's tokens back when nothing else could be
    # scheduled (engine.overlap): the host's per-step work then runs while the GPU computes
    overlap_decode: bool = True
    check_integrity: bool = False  # verify the pool's bookkeeping after every step (tests, debugging)

    def __post_init__(self) -> None:
        if self.cache_tokens is not None and self.cache_tokens < self.block_size:
            raise ValueError(f"cache_tokens: must hold at least one block ({self.block_size} tokens)")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError(f"gpu_memory_fraction: must be in (0, 1], got {self.gpu_memory_fraction}")
        self.scheduler_config()  # validates its fields

    def scheduler_config(self, gold_tail_len: int = 0) -> SchedulerConfig:
        """`gold_tail_len`: the model's (ModelConfig.gold_tail_len). Prompts then end with a chunk at
        least that long, so that the GOLD layers skip the chunks before; not when the token budget
        is under twice that (a prompt's last chunk could wait too long for a step to fit it)."""
        min_final = gold_tail_len if self.max_num_batched_tokens >= 2 * gold_tail_len else 0
        return SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                               max_model_len=self.max_model_len, min_final_chunk=min_final,
                               prefill_only_batched_tokens=self.prefill_only_batched_tokens)


def cache_config_for(config: EngineConfig, model) -> CacheConfig:
    """Blocks from cache_tokens, else from a byte budget (given, or a fraction of free GPU memory
    after the state slots), so the pool's size is what the allocation really holds."""
    mc = model.config
    num_slots = config.num_slots or config.max_num_seqs
    if config.cache_tokens is not None:
        num_blocks = -(-config.cache_tokens // config.block_size)
    else:
        budget = config.cache_bytes
        if budget is None:
            if model.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(model.device)
                slot_bytes = num_slots * _slot_bytes(mc, model.dtype)
                budget = int(max(0, free - slot_bytes) * config.gpu_memory_fraction)
            else:
                budget = config.cpu_cache_bytes
        num_blocks = PagedKeyCache.num_blocks_for_budget(budget, config.block_size, mc.compressed_dim, model.dtype)
    if num_blocks < 1:
        raise ValueError("cache_bytes: the budget does not hold a single block")
    return CacheConfig(num_blocks=num_blocks, block_size=config.block_size, num_slots=num_slots)


def _slot_bytes(mc, dtype: torch.dtype) -> int:
    elt = torch.tensor([], dtype=dtype).element_size()
    return mc.n_finch * mc.n_head * mc.head_size ** 2 * 4 + 2 * mc.n_layer * mc.n_embd * elt


def working_set_budget(config: EngineConfig, device: torch.device) -> int:
    """Bytes for K/V working sets, decided after the pool and slots are allocated."""
    if config.kv_working_set_bytes is not None:
        return config.kv_working_set_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # free in torch's cache
        return int((free + cached) * 0.6)  # the rest: activations of prefill chunks, graphs
    return 256 << 20
