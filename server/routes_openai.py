"""POST /v1/completions and /v1/chat/completions, streamed (SSE) or not."""
from __future__ import annotations

import json
import time
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from engine.outputs import RequestOutput

from .errors import APIError, error_body
from .generation import collect, new_id, stream_updates
from .protocol import (AS_IDS, chat_logprobs, check_text, chat_params, completion_logprobs, completion_params, finish_reason,
                       prompt_list, usage_dict)
from .schemas import ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse
from .state import ServerState


# characters that some line readers (httpx's iter_lines, str.splitlines) take for line ends,
# although SSE ends lines at CR and LF only: escaped in the JSON so no client splits an event
_LINE_BREAKERS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029", "\x0b": "\\u000b",
                  "\x0c": "\\u000c", "\x1c": "\\u001c", "\x1d": "\\u001d", "\x1e": "\\u001e"}
_ESCAPE = str.maketrans(_LINE_BREAKERS)


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data.translate(_ESCAPE)}\n\n".encode()


def make_router(state: ServerState, auth) -> APIRouter:
    router = APIRouter()

    async def prepare_prompts(prompts: list, session_id: str | None, owner: str | None) -> list:
        """Text prompts on a session resume by text: the session's tokens, then the rest encoded."""
        tok = state.tokenizer
        if session_id is None or tok is None or len(prompts) != 1 or not isinstance(prompts[0], str):
            return prompts
        text = prompts[0]

        def session_tokens(engine) -> list[int]:
            if session_id not in engine.sessions:
                return []
            try:
                return list(engine.sessions.get(session_id, owner).token_ids)
            except ValueError:
                return []

        held = await state.require_engine().call(session_tokens)
        if not held:
            return prompts
        fresh = tok.encode(text)
        if len(fresh) > len(held) and fresh[: len(held)] == held:  # the usual case: ids line up
            return [fresh]
        # the conversation's text goes on from the session's, but its tokens split differently at
        # the seam (a reply re-tokenised with what follows): keep the session's ids, encode the rest
        held_text = tok.decode(held)
        if text.startswith(held_text) and len(text) > len(held_text):
            return [held + tok.encode(text[len(held_text):])]
        return [fresh]

    @router.post("/v1/completions", responses={200: {"model": CompletionResponse, "content": {
        "text/event-stream": {"schema": {"type": "string", "description": "SSE chunks, then data: [DONE]"}}}}})
    async def completions(body: CompletionRequest, request: Request, owner=Depends(auth)):
        state.check_model(body.model)
        params = completion_params(body, state.settings.limits)
        prompts = await prepare_prompts(prompt_list(body.prompt), body.session_id, owner)
        if body.session_id is not None and len(prompts) != 1:
            raise APIError(400, "session_id: a request on a session takes one prompt", param="session_id")
        rid, created, model = new_id("cmpl"), int(time.time()), state.settings.served_model_name
        echo_texts = [_prompt_text(state, p) if body.echo else "" for p in prompts]
        if body.stream:
            return await _stream_response(state, completion_events(state, body, params, prompts, rid, created, model,
                                                             echo_texts, owner))
        outputs = await collect(state, request, prompts, params, body.session_id, owner)
        choices = []
        for i, out in enumerate(outputs):
            for o in out.outputs:
                choices.append({"index": i * body.n + o.index, "text": echo_texts[i] + o.text,
                                "logprobs": completion_logprobs(_lp_tok(state, body), o.logprobs)
                                if o.logprobs is not None else None,
                                "finish_reason": finish_reason(o), "stop_reason": o.stop_reason})
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                             "choices": choices, "usage": usage_dict(outputs)})

    @router.post("/v1/chat/completions", responses={200: {"model": ChatCompletionResponse, "content": {
        "text/event-stream": {"schema": {"type": "string", "description": "SSE chunks, then data: [DONE]"}}}}})
    async def chat(body: ChatCompletionRequest, request: Request, owner=Depends(auth)):
        state.check_model(body.model)
        if state.tokenizer is None:
            raise APIError(400, "messages: chat needs a tokenizer; this model has none", param="messages")
        text = check_text(state.template.render(body.messages, body.add_generation_prompt), "messages")
        prompts = await prepare_prompts([text], body.session_id, owner)
        prompt_len = len(prompts[0]) if isinstance(prompts[0], list) else len(state.tokenizer.encode(text))
        params = chat_params(body, state.settings.limits, state.settings.max_model_len, prompt_len,
                             state.template.stop)
        rid, created, model = new_id("chatcmpl"), int(time.time()), state.settings.served_model_name
        if body.stream:
            return await _stream_response(state, chat_events(state, body, params, prompts, rid, created, model, owner))
        outputs = await collect(state, request, prompts, params, body.session_id, owner)
        choices = [{"index": o.index, "message": {"role": "assistant", "content": o.text},
                    "logprobs": chat_logprobs(_lp_tok(state, body), o.logprobs) if o.logprobs is not None else None,
                    "finish_reason": finish_reason(o), "stop_reason": o.stop_reason} for o in outputs[0].outputs]
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model,
                             "choices": choices, "usage": usage_dict(outputs)})

    return router


def _lp_tok(state: ServerState, body):
    """How logprobs name tokens: their text, or "token_id:<id>" when the request asks."""
    return AS_IDS if body.return_tokens_as_token_ids else state.tokenizer


def _prompt_text(state: ServerState, prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return state.tokenizer.decode(prompt) if state.tokenizer else ""


async def _stream_response(state: ServerState, events: AsyncIterator[dict]) -> StreamingResponse:
    """Starts the generation before answering, so that validation errors, a full queue (429) or a
    dead engine (503) get their status code; later errors become an error event in the stream."""
    it = events.__aiter__()
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        first = None

    async def body() -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield sse(first)
                async for event in it:
                    yield sse(event)
            yield sse("[DONE]")
        except APIError as exc:
            yield sse(error_body(exc.message, exc.type, exc.param, exc.code))
            yield sse("[DONE]")
        finally:
            await it.aclose()  # a client that left: abort the engine requests at once

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def completion_events(state: ServerState, body: CompletionRequest, params, prompts, rid, created, model,
                            echo_texts, owner) -> AsyncIterator[dict]:
    base = {"id": rid, "object": "text_completion", "created": created, "model": model}
    finals: dict[int, RequestOutput] = {}
    echoed: set[int] = set()
    async for i, update in stream_updates(state, prompts, params, rid, body.session_id, owner):
        for d in update.deltas:
            index = i * body.n + d.index
            text = d.text
            if body.echo and index not in echoed:
                echoed.add(index)
                text = echo_texts[i] + text
            lp = completion_logprobs(_lp_tok(state, body), list(d.logprobs)) if d.logprobs else None
            if not text and lp is None and d.finish_reason is None:
                continue
            yield {**base, "choices": [{"index": index, "text": text, "logprobs": lp,
                                        "finish_reason": _stream_finish(d.finish_reason),
                                        "stop_reason": d.stop_reason}]}
        if update.finished:
            finals[i] = update.output
    if body.stream_options and body.stream_options.include_usage:
        yield {**base, "choices": [], "usage": usage_dict([finals[i] for i in sorted(finals)])}


async def chat_events(state: ServerState, body: ChatCompletionRequest, params, prompts, rid, created, model,
                      owner) -> AsyncIterator[dict]:
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    updates = stream_updates(state, prompts, params, rid, body.session_id, owner)
    first = True
    final = None
    async for _, update in updates:
        if first:  # the role comes first, once per choice (after validation passed)
            first = False
            for j in range(body.n):
                yield {**base, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]}
        for d in update.deltas:
            lp = chat_logprobs(_lp_tok(state, body), list(d.logprobs)) if d.logprobs else None
            if d.text or lp is not None:
                yield {**base, "choices": [{"index": d.index, "delta": {"content": d.text}, "logprobs": lp,
                                            "finish_reason": None}]}
            if d.finish_reason is not None:
                yield {**base, "choices": [{"index": d.index, "delta": {}, "logprobs": None,
                                            "finish_reason": _stream_finish(d.finish_reason),
                                            "stop_reason": d.stop_reason}]}
        if update.finished:
            final = update.output
    if body.stream_options and body.stream_options.include_usage and final is not None:
        yield {**base, "choices": [], "usage": usage_dict([final])}


def _stream_finish(reason: str | None) -> str | None:
    if reason == "error":
        raise APIError(500, "the model step failed for this request; it was not retried", "internal_server_error")
    return None if reason is None else ("length" if reason == "length" else "stop")
