"""Building the engine the server runs: model, tokenizer, chat template, metrics."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from engine.async_engine import AsyncEngine
from engine.config_engine import EngineConfig
from engine.engine import LLMEngine
from engine.loader import find_weights, load_checkpoint
from engine.model import GoldFinchModel
from engine.tokenizer import load_tokenizer

from .chat_template import ChatTemplate
from .metrics import ServerMetrics
from .state import ServerState

log = logging.getLogger("goldfinch.server")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO_ROOT / "models" / "demo"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "rwkv_vocab_v20230424.txt")


def default_model_path() -> Path | None:
    """The built-in demo model when it is there; None selects the random-weight test model."""
    try:
        find_weights(DEMO_MODEL)
        return DEMO_MODEL
    except FileNotFoundError:
        return None


def pick_device_dtype(device: str | None, dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        return dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype: unsupported {dtype!r}")
    return dev, getattr(torch, dtype)


def load_model(model_path: Path | None, device: torch.device, dtype: torch.dtype) -> GoldFinchModel:
    if model_path is None:
        from engine.random_model import random_checkpoint

        log.warning("no model given and no built-in demo model found: serving RANDOM weights "
                    "('goldfinch-random-test'); its output is noise")
        return GoldFinchModel(random_checkpoint(dtype=dtype, device=device))
    from tqdm import tqdm

    ck = load_checkpoint(model_path, dtype=dtype, device=device,
                         progress=lambda keys: tqdm(keys, desc="loading weights", unit="tensor", leave=False))
    return GoldFinchModel(ck)


def find_tokenizer(spec: str | None, model_path: Path | None):
    if spec:
        return load_tokenizer(spec)
    if model_path is not None:
        folder = model_path if model_path.is_dir() else model_path.parent
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                return load_tokenizer(folder / name)
    return None


def build_engine(state: ServerState, args: argparse.Namespace, model_path: Path | None) -> None:
    device, dtype = pick_device_dtype(args.device, args.dtype)
    model = load_model(Path(model_path) if model_path else None, device, dtype)
    tokenizer = find_tokenizer(args.tokenizer, Path(model_path) if model_path else None)
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer: vocabulary {tokenizer.vocab_size} larger than the model's "
                         f"{model.config.vocab_size}")
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          prefill_only_batched_tokens=args.prefill_only_batched_tokens,
                          max_model_len=args.max_model_len, block_size=args.block_size,
                          cache_tokens=args.cache_tokens, gpu_memory_fraction=args.gpu_memory_fraction,
                          session_host_bytes=args.session_host_bytes,
                          kv_working_set_bytes=args.kv_working_set_bytes, cuda_graphs=not args.no_cuda_graphs,
                          prefill_graphs=not args.no_cuda_graphs,
                          overlap_decode=not args.no_overlap_decode)
    engine = LLMEngine(model, tokenizer, config)
    folder = Path(model_path) if model_path and Path(model_path).is_dir() else None
    state.tokenizer = tokenizer
    state.template = ChatTemplate.for_model(folder)
    async_engine = AsyncEngine(engine, max_waiting=args.max_queue)
    state.metrics = ServerMetrics(engine, state.settings.served_model_name, lambda: async_engine.alive)
    async_engine.on_update = state.metrics.observe
    async_engine.on_fatal = state.on_fatal
    state.engine = async_engine.start()
