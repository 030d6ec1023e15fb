"""What the HTTP layer holds: the running engine and the server's configuration, built once."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from engine.async_engine import AsyncEngine, EngineDead, QueueFull
from engine.tokenizer import Tokenizer

from .auth import ApiKeys
from .chat_template import ChatTemplate
from .errors import APIError
from .metrics import ServerMetrics
from .protocol import Limits


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str
    max_model_len: int
    limits: Limits = Limits()
    api_keys: tuple[str, ...] = ()
    open_health: bool = True  # /health without an API key
    open_metrics: bool = True  # /metrics without an API key
    max_body_bytes: int = 8 * 1024 * 1024
    retry_after_s: int = 1
    session_dir: Path | None = None  # where sessions are saved and restored (never a client path)
    save_sessions_on_shutdown: bool = False


@dataclass
class ServerState:
    settings: ServerSettings
    keys: ApiKeys
    engine: AsyncEngine | None = None
    tokenizer: Tokenizer | None = None
    template: ChatTemplate | None = None
    metrics: ServerMetrics | None = None
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    on_fatal: Callable[[BaseException], None] | None = None  # set by the CLI: stop the process

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.alive

    def require_engine(self) -> AsyncEngine:
        if self.engine is None:
            raise APIError(503, "the model is still loading" if self.load_error is None
                           else f"the model failed to load: {self.load_error}", "service_unavailable")
        if not self.engine.alive:
            raise APIError(503, "the engine stopped after a fatal error; the server is restarting",
                           "service_unavailable")
        return self.engine

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.served_model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves "
                                f"{self.settings.served_model_name!r}", "not_found_error", "model", "model_not_found")

    def queue_full_error(self, exc: QueueFull) -> APIError:
        return APIError(429, f"server busy: {exc}; retry later", "rate_limit_error",
                        headers={"Retry-After": str(self.settings.retry_after_s)})

    @staticmethod
    def dead_error(exc: EngineDead) -> APIError:
        return APIError(503, str(exc), "service_unavailable")
