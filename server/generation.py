"""Running one HTTP request's prompts through the engine: collected, or merged into one stream.

Leaving a stream (client gone) or cancelling a collection aborts every engine request it started,
which frees their cache at once.
"""
from __future__ import annotations

import asyncio
import uuid
from typing import AsyncIterator

from fastapi import Request

from engine.async_engine import AsyncEngine, EngineDead, QueueFull
from engine.outputs import RequestOutput, RequestUpdate
from engine.sampling_params import SamplingParams
from engine.sessions import SessionError

from .errors import APIError, from_value_error
from .state import ServerState

_DONE = object()


async def _updates(state: ServerState, engine: AsyncEngine, prompt, params: SamplingParams, request_id: str,
                   session_id: str | None, owner: str | None) -> AsyncIterator[RequestUpdate]:
    """Engine updates for one prompt, with engine errors turned into API errors."""
    try:
        async for update in engine.generate(prompt, params, request_id, session_id=session_id, owner=owner):
            yield update
    except QueueFull as exc:
        raise state.queue_full_error(exc) from None
    except SessionError as exc:
        status = 409 if "in use" in str(exc) else 404
        raise APIError(status, str(exc), "invalid_request_error", "session_id") from None
    except ValueError as exc:
        raise from_value_error(exc) from None
    except EngineDead as exc:
        raise state.dead_error(exc) from None


async def stream_updates(state: ServerState, prompts: list, params: SamplingParams, base_id: str,
                         session_id: str | None, owner: str | None) -> AsyncIterator[tuple[int, RequestUpdate]]:
    """(prompt index, update) from all prompts as they come. The first update of every prompt is
    awaited before anything is yielded, so validation errors surface before a stream starts."""
    engine = state.require_engine()
    merged: asyncio.Queue = asyncio.Queue()
    iterators = [_updates(state, engine, p, params, f"{base_id}-{i}", session_id, owner).__aiter__()
                 for i, p in enumerate(prompts)]
    firsts = []
    try:
        for it in iterators:  # sequentially: the queue bound and validation apply per prompt
            firsts.append(await it.__anext__())
    except BaseException:
        for it in iterators:
            await it.aclose()
        raise

    async def pump(i: int, it) -> None:
        try:
            await merged.put((i, firsts[i]))
            if not firsts[i].finished:
                async for update in it:
                    await merged.put((i, update))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await merged.put((i, exc))
        finally:
            await merged.put((i, _DONE))

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await merged.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # they leave their iterators first
        for it in iterators:
            await it.aclose()


async def collect(state: ServerState, http_request: Request, prompts: list, params: SamplingParams,
                  session_id: str | None, owner: str | None) -> list[RequestOutput]:
    """Runs all prompts to completion; a client that disconnects meanwhile aborts them."""
    base_id = f"cmpl-{uuid.uuid4().hex}"
    outputs: dict[int, RequestOutput] = {}

    async def run() -> None:
        async for i, update in stream_updates(state, prompts, params, base_id, session_id, owner):
            if update.finished:
                outputs[i] = update.output

    task = asyncio.create_task(run())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                task.result()  # re-raises an API error of the generation
                return [outputs[i] for i in range(len(prompts))]
            if await http_request.is_disconnected():
                raise APIError(499, "client closed the request", "invalid_request_error")
    finally:
        if not task.done():
            task.cancel()  # aborts the engine requests (their streams close)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
