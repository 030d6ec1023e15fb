"""The FastAPI application: routes, authentication, body-size limit, health and metrics."""
from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .errors import APIError, error_body, install_error_handlers
from .routes_openai import make_router
from .routes_sessions import make_session_router
from .schemas import DetokenizeRequest, ModelCard, ModelList, TokenizeRequest
from .state import ServerState


class BodySizeLimit:
    """Refuses bodies over the limit with 413, by Content-Length or while reading a chunked body."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._reject(send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send) -> None:
        body = JSONResponse(error_body(f"request body larger than {self.max_bytes} bytes", "invalid_request_error"),
                            413).body
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_app(state: ServerState, lifespan=None) -> FastAPI:
    app = FastAPI(title="GoldFinch Serve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server for GoldFinch (RWKV-6 + GOLD attention) models")
    install_error_handlers(app)
    app.state.server = state

    def auth(request: Request) -> str | None:
        return state.keys.check(request)

    def auth_unless(open_: bool):
        def check(request: Request) -> str | None:
            return None if open_ else state.keys.check(request)
        return check

    @app.get("/health")
    async def health(_=Depends(auth_unless(state.settings.open_health))):
        if state.ready:
            return {"status": "ok"}
        reason = ("loading" if state.engine is None and state.load_error is None
                  else "failed" if state.engine is None else "engine dead")
        return JSONResponse(error_body(f"not ready: {reason}", "service_unavailable"), 503)

    @app.get("/metrics")
    async def metrics(_=Depends(auth_unless(state.settings.open_metrics))):
        if state.metrics is None:
            raise APIError(503, "the model is still loading", "service_unavailable")
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", response_model=ModelList)
    async def models(_=Depends(auth)):
        s = state.settings
        return ModelList(data=[ModelCard(id=s.served_model_name, created=state.created, max_model_len=s.max_model_len)])

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, _=Depends(auth)):
        state.check_model(body.model)
        tok = _tokenizer(state)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "prompt: give exactly one of prompt or messages", param="prompt")
        text = body.prompt if body.prompt is not None else state.template.render(body.messages,
                                                                                  body.add_generation_prompt)
        tokens = tok.encode(text)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": state.settings.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, _=Depends(auth)):
        state.check_model(body.model)
        tok = _tokenizer(state)
        bad = next((t for t in body.tokens if t >= tok.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"tokens: token id {bad} is outside the vocabulary [0, {tok.vocab_size})",
                           param="tokens")
        return {"prompt": tok.decode(body.tokens)}

    app.include_router(make_router(state, auth))
    app.include_router(make_session_router(state, auth))
    return app


def _tokenizer(state: ServerState):
    state.require_engine()
    if state.tokenizer is None:
        raise APIError(400, "this model has no tokenizer: use token ids", param="model")
    return state.tokenizer


def with_body_limit(app: FastAPI, max_bytes: int):
    return BodySizeLimit(app, max_bytes)
