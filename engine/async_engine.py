"""The engine's step loop in one background thread, with asyncio streams for the server.

Every call that touches engine state runs in that thread (commands are queued to it), so the
engine itself needs no locks. Each request gets an asyncio queue of `RequestUpdate`s; leaving its
stream early (client gone) aborts the request, which frees its cache at once.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from .engine import LLMEngine
from .outputs import RequestUpdate
from .sampling_params import SamplingParams

log = logging.getLogger("goldfinch.engine")


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later."""


class EngineDead(RuntimeError):
    """The engine loop stopped after a fatal error."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int = 256, idle_wait_s: float = 0.05) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.idle_wait_s = idle_wait_s
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._pending = 0  # adds queued but not yet taken by the loop
        self._stop = threading.Event()
        self.fatal_error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="goldfinch-engine", daemon=True)
        self.on_update: Callable[[RequestUpdate], None] | None = None  # metrics hook (engine thread)
        self.on_fatal: Callable[[BaseException], None] | None = None

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "AsyncEngine":
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.fatal_error is None

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + self._pending

    # ---- calls into the engine thread ----------------------------------------------------------
    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Runs fn(engine) in the engine thread between steps; returns its result or raises."""
        if not self.alive:
            raise EngineDead("the engine is not running")
        future: cf.Future = cf.Future()
        self._commands.put((fn, future))
        return await asyncio.wrap_future(future)

    def call_blocking(self, fn: Callable[[LLMEngine], Any], timeout: float = 60.0) -> Any:
        """Like `call`, from a thread without an event loop (shutdown hooks)."""
        if not self.alive:
            raise EngineDead("the engine is not running")
        future: cf.Future = cf.Future()
        self._commands.put((fn, future))
        return future.result(timeout=timeout)

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                       session_id: str | None = None, owner: str | None = None) -> AsyncIterator[RequestUpdate]:
        """Adds a request and yields its updates until it finishes. Validation errors
        (ValueError, SessionError) are raised before the first update; QueueFull when the waiting
        queue is at its bound. Closing the iterator early aborts the request."""
        if self.num_waiting >= self.max_waiting:
            raise QueueFull(f"the waiting queue is full ({self.max_waiting} requests)")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._pending += 1

        def add(engine: LLMEngine) -> str:
            self._pending -= 1
            rid = engine.add_request(prompt, params, request_id=request_id, session_id=session_id, owner=owner)
            self._streams[rid] = stream
            return rid

        await self.call(add)
        finished = False
        try:
            while True:
                update = await stream.queue.get()
                if isinstance(update, BaseException):
                    raise update
                yield update
                if update.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._abort_soon(request_id)

    def _abort_soon(self, request_id: str) -> None:
        def abort(engine: LLMEngine) -> None:
            self._streams.pop(request_id, None)
            update = engine.abort(request_id)
            if update is not None and self.on_update is not None:
                self.on_update(update)

        if self.alive:
            self._commands.put((abort, cf.Future()))

    # ---- the loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._run_commands(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished():
                    self._dispatch(self.engine.step())
        except BaseException as exc:  # fatal: fail everyone, report, stop
            log.exception("engine loop died")
            self.fatal_error = exc
            for stream in list(self._streams.values()):
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, EngineDead(f"engine died: {exc!r}"))
            self._streams.clear()
            self._fail_commands(exc)
            if self.on_fatal is not None:
                self.on_fatal(exc)

    def _run_commands(self, block: bool) -> None:
        try:
            item = self._commands.get(timeout=self.idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except Exception as exc:  # a bad request: its caller gets the exception
                    future.set_exception(exc)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _fail_commands(self, exc: BaseException) -> None:
        while True:
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return
            if item is not None and not item[1].done():
                item[1].set_exception(EngineDead(f"engine died: {exc!r}"))

    def _dispatch(self, updates: list[RequestUpdate]) -> None:
        for update in updates:
            if self.on_update is not None:
                self.on_update(update)
            stream = self._streams.get(update.request_id)
            if stream is None:
                continue
            if update.finished:
                del self._streams[update.request_id]
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, update)
