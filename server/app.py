"""The FastAPI application: routes, authentication, body-size limit, health and metrics."""
from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .errors import APIError, error_body, install_error_handlers
from .protocol import check_text
from .routes_openai import make_router
from .routes_sessions import make_session_router
from .schemas import (DetokenizeRequest, DetokenizeResponse, ErrorResponse, HealthResponse, ModelCard, ModelList,
                      TokenizeRequest, TokenizeResponse)
from .state import ServerState


class BodySizeLimit:
    """Refuses bodies over the limit with 413, by Content-Length or by counting a chunked body.

    The body is read here in full (it is bounded) and replayed to the app, so the refusal never
    happens halfway through the app's own parsing (which would turn it into a 400)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._reject(send)
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                return await self._reject(send)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notifications

        await self.app(scope, replay, send)

    async def _reject(self, send) -> None:
        body = JSONResponse(error_body(f"request body larger than {self.max_bytes} bytes", "invalid_request_error"),
                            413).body
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


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

    @app.get("/health", responses={200: {"model": HealthResponse}})
    async def health(_=Depends(auth_unless(state.settings.open_health))):
        if state.ready:
            return {"status": "ok"}
        reason = ("loading" if state.engine is None and state.load_error is None
                  else "failed" if state.engine is None else "engine dead")
        return JSONResponse(error_body(f"not ready: {reason}", "service_unavailable"), 503)

    @app.get("/metrics", responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                          "description": "Prometheus text format"}})
    async def metrics(_=Depends(auth_unless(state.settings.open_metrics))):
        if state.metrics is None:
            raise APIError(503, "the model is still loading", "service_unavailable")
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", response_model=ModelList)
    async def models(_=Depends(auth)):
        s = state.settings
        return ModelList(data=[ModelCard(id=s.served_model_name, created=state.created, max_model_len=s.max_model_len)])

    @app.post("/tokenize", responses={200: {"model": TokenizeResponse}})
    async def tokenize(body: TokenizeRequest, _=Depends(auth)):
        state.check_model(body.model)
        tok = _tokenizer(state)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "prompt: give exactly one of prompt or messages", param="prompt")
        text = body.prompt if body.prompt is not None else state.template.render(body.messages,
                                                                                  body.add_generation_prompt)
        tokens = tok.encode(check_text(text, "prompt" if body.prompt is not None else "messages"))
        return {"tokens": tokens, "count": len(tokens), "max_model_len": state.settings.max_model_len}

    @app.post("/detokenize", responses={200: {"model": DetokenizeResponse}})
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
    app.openapi = lambda: _openapi(app)
    return app


ERROR_STATUSES = {"400": "invalid field (named in error.param)", "401": "missing or wrong API key",
                  "404": "unknown model, session or path", "409": "session in use", "413": "body too large",
                  "429": "waiting queue full (Retry-After)", "500": "model step failed",
                  "503": "not ready (loading, or the engine died)"}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document, corrected to what the server sends: OpenAI's error body for every error
    status, and no 422 (validation errors are answered with 400)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    for defs_name, defs in schemas["ErrorResponse"].pop("$defs", {}).items():
        schemas.setdefault(defs_name, defs)
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for path, ops in doc["paths"].items():
        for op in ops.values():
            op["responses"].pop("422", None)
            for status, text in ERROR_STATUSES.items():
                op["responses"].setdefault(status, {"description": text, **error})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    app.openapi_schema = doc
    return doc


def _tokenizer(state: ServerState):
    state.require_engine()
    if state.tokenizer is None:
        raise APIError(400, "this model has no tokenizer: use token ids", param="model")
    return state.tokenizer


def with_body_limit(app: FastAPI, max_bytes: int):
    return BodySizeLimit(app, max_bytes)
