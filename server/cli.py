"""`goldfinch-serve`: load a model, start the engine, serve the OpenAI-compatible API.

Every option can also be set by an environment variable GOLDFINCH_<OPTION> (e.g.
GOLDFINCH_MAX_MODEL_LEN=8192); API keys by GOLDFINCH_API_KEY (comma-separated for several).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
from pathlib import Path

from .app import create_app, with_body_limit
from .loading import build_engine, default_model_path
from .protocol import Limits
from .state import ServerSettings, ServerState
from .auth import ApiKeys

log = logging.getLogger("goldfinch.server")

OPTIONS = [
    # name, type, default, help
    ("model", str, None, "model folder or weights file (default: the built-in demo model)"),
    ("tokenizer", str, None, "tokenizer: a .model / tokenizer.json path or 'rwkv_world' (default: beside the model)"),
    ("host", str, "127.0.0.1", "address to listen on (0.0.0.0 in a container)"),
    ("port", int, 8000, "port"),
    ("device", str, None, "cuda, cuda:N or cpu (default: cuda when available)"),
    ("dtype", str, "auto", "bfloat16, float16, float32 or auto (bf16 on GPU, fp32 on CPU)"),
    ("max_model_len", int, 4096, "prompt + output tokens per request"),
    ("max_num_seqs", int, 64, "sequences decoded together (RNN state slots)"),
    ("max_num_batched_tokens", int, 2048, "tokens per engine step (decodes + prefill chunks)"),
    ("prefill_only_batched_tokens", int, 8192, "tokens per engine step while no sequence is decoding: longer "
     "prompt chunks, faster (0: --max-num-batched-tokens)"),
    ("cache_tokens", int, None, "compressed-key pool capacity in tokens (default: from free memory)"),
    ("gpu_memory_fraction", float, 0.5, "share of free GPU memory for the key pool when --cache-tokens is not set"),
    ("block_size", int, 16, "tokens per pool block"),
    ("kv_working_set_bytes", int, None, "memory for materialised per-layer K/V of decoding sequences (default: 60%% "
     "of the GPU memory left after the key pool, 256 MiB on the CPU; 0: derive keys from the pool every step)"),
    ("max_queue", int, 256, "waiting requests before 429"),
    ("max_tokens_limit", int, 4096, "largest max_tokens a request may ask"),
    ("max_n", int, 16, "largest n a request may ask"),
    ("max_body_bytes", int, 8 * 1024 * 1024, "largest request body"),
    ("api_key", str, None, "require this API key (comma-separated for several)"),
    ("served_model_name", str, None, "model name in the API (default: the model folder's name)"),
    ("session_dir", str, None, "folder for saved sessions (enables save/restore)"),
    ("session_host_bytes", int, 4 << 30, "host memory for sessions moved off the device"),
    ("cpu_threads", int, None, "torch CPU threads (default: torch's choice; 1 suits small models on busy hosts)"),
    ("log_level", str, "info", "debug, info, warning, error"),
]
FLAGS = [
    ("protect_health", "require the API key for /health"),
    ("protect_metrics", "require the API key for /metrics"),
    ("save_sessions_on_shutdown", "save every session to --session-dir on a graceful shutdown"),
    ("no_cuda_graphs", "launch decode steps and prompt chunks from Python instead of replaying CUDA graphs (debugging)"),
    ("no_overlap_decode", "read every decode step's tokens back before launching the next (debugging)"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="goldfinch-serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, type_, default, help_ in OPTIONS:
        env = f"GOLDFINCH_{name.upper()}"
        value = os.environ.get(env, default)
        ap.add_argument("--" + name.replace("_", "-"), type=type_, default=type_(value) if value is not None else None,
                        help=f"{help_} [env {env}]")
    for name, help_ in FLAGS:
        env = f"GOLDFINCH_{name.upper()}"
        ap.add_argument("--" + name.replace("_", "-"), action="store_true",
                        default=os.environ.get(env, "").lower() in ("1", "true", "yes"), help=f"{help_} [env {env}]")
    args = ap.parse_args(argv)
    if args.api_key is None and os.environ.get("GOLDFINCH_API_KEY"):
        args.api_key = os.environ["GOLDFINCH_API_KEY"]
    return args


def settings_from(args: argparse.Namespace, model_name: str) -> ServerSettings:
    return ServerSettings(
        served_model_name=args.served_model_name or model_name, max_model_len=args.max_model_len,
        limits=Limits(max_tokens=args.max_tokens_limit, max_n=args.max_n),
        api_keys=tuple(k.strip() for k in (args.api_key or "").split(",") if k.strip()),
        open_health=not args.protect_health, open_metrics=not args.protect_metrics,
        max_body_bytes=args.max_body_bytes, session_dir=Path(args.session_dir) if args.session_dir else None,
        save_sessions_on_shutdown=args.save_sessions_on_shutdown)


def make_server_app(args: argparse.Namespace):
    """The ASGI app; the model loads in a thread so /health answers 503 meanwhile."""
    model_path = args.model or default_model_path()
    model_name = Path(str(model_path)).name if model_path else "goldfinch-random-test"
    settings = settings_from(args, model_name)
    if settings.session_dir is not None:
        settings.session_dir.mkdir(parents=True, exist_ok=True)
    state = ServerState(settings=settings, keys=ApiKeys(list(settings.api_keys)))

    def load() -> None:
        try:
            build_engine(state, args, model_path)
            log.info("GoldFinch Serve ready at http://%s:%d (model %s)", args.host, args.port,
                     settings.served_model_name)
            print(f"GoldFinch Serve ready at http://{args.host}:{args.port}/v1 "
                  f"(model {settings.served_model_name})", flush=True)
        except Exception as exc:  # reported by /health; the process stays up to say so
            log.exception("model failed to load")
            state.load_error = f"{type(exc).__name__}: {exc}"

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        threading.Thread(target=load, name="goldfinch-load", daemon=True).start()
        yield
        shutdown(state)

    app = create_app(state, lifespan=lifespan)
    return with_body_limit(app, settings.max_body_bytes), state


def shutdown(state: ServerState) -> None:
    if state.engine is None:
        return
    if state.settings.save_sessions_on_shutdown and state.settings.session_dir is not None and state.engine.alive:
        from .routes_sessions import SUFFIX

        def save_all(engine) -> int:
            saved = 0
            for s in engine.sessions.sessions():
                if s.covered_tokens and not s.busy and not s.absorbing:
                    engine.save_session(s.session_id, str(state.settings.session_dir / f"{s.session_id}{SUFFIX}"),
                                        s.owner)
                    saved += 1
            return saved

        try:
            n = state.engine.call_blocking(save_all)
            log.info("saved %d sessions to %s", n, state.settings.session_dir)
        except Exception:
            log.exception("saving sessions on shutdown failed")
    state.engine.shutdown()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # the engine thread runs Python between kernels; hand the GIL to the HTTP event loop often so
    # that a 429 or a health check never waits a 5 ms switch interval behind every step
    sys.setswitchinterval(0.001)
    if args.cpu_threads:
        import torch

        torch.set_num_threads(args.cpu_threads)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    app, state = make_server_app(args)
    # keep-alive longer than clients' usual 5 s pool expiry, so the server never closes a connection
    # that a client is just reusing
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=10, timeout_keep_alive=30)
    server = uvicorn.Server(config)

    def on_fatal(exc: BaseException) -> None:  # device lost etc.: stop so an orchestrator restarts us
        log.critical("fatal engine error, shutting down: %r", exc)
        server.should_exit = True

    state.on_fatal = on_fatal
    server.run()
    if state.engine is not None and state.engine.fatal_error is not None:
        sys.exit(3)
    if state.load_error is not None:
        sys.exit(2)


if __name__ == "__main__":
    main()
