"""Session endpoints: open, inspect, close, save to and restore from the server's session folder.

Files live only in the configured `--session-dir` under the session's id: a client never names a
path. Sessions are scoped to the API key that created them; another key's session reads as missing.
"""
from __future__ import annotations

import re

from fastapi import APIRouter, Depends

from engine.session_file import SessionFileError
from engine.sessions import Session, SessionError

from .errors import APIError
from .schemas import SessionCreateRequest, SessionDeleted, SessionInfo, SessionRestoreRequest, SessionSaved
from .state import ServerState

SUFFIX = ".session"


def session_info(s: Session) -> SessionInfo:
    return SessionInfo(id=s.session_id, num_tokens=s.covered_tokens, location=s.location,
                       busy=s.busy or s.absorbing, created=int(s.created))


def make_session_router(state: ServerState, auth) -> APIRouter:
    router = APIRouter(prefix="/v1/sessions")

    async def call(fn):
        try:
            return await state.require_engine().call(fn)
        except SessionError as exc:
            status = 409 if "in use" in str(exc) or "holds no state" in str(exc) else 404
            raise APIError(status, str(exc), "invalid_request_error" if status == 409 else "not_found_error",
                           "session_id") from None
        except SessionFileError as exc:
            raise APIError(400, str(exc), "invalid_request_error", "session_id") from None

    def path_for(session_id: str):
        if state.settings.session_dir is None:
            raise APIError(400, "session_id: this server has no --session-dir; saving is off", param="session_id")
        return state.settings.session_dir / f"{session_id}{SUFFIX}"

    @router.post("", response_model=SessionInfo)
    async def create(body: SessionCreateRequest | None = None, owner=Depends(auth)):
        sid = body.session_id if body else None
        return await call(lambda e: session_info(e.sessions.open(sid, owner)))

    @router.get("/{session_id}", response_model=SessionInfo)
    async def inspect(session_id: str, owner=Depends(auth)):
        _check_id(session_id)
        return await call(lambda e: session_info(e.sessions.get(session_id, owner)))

    @router.delete("/{session_id}", responses={200: {"model": SessionDeleted}})
    async def close(session_id: str, owner=Depends(auth)):
        _check_id(session_id)
        await call(lambda e: e.sessions.close(session_id, owner))
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    @router.post("/{session_id}/save", responses={200: {"model": SessionSaved}})
    async def save(session_id: str, owner=Depends(auth)):
        _check_id(session_id)
        path = path_for(session_id)
        size = await call(lambda e: e.save_session(session_id, str(path), owner))
        return {"id": session_id, "object": "session.saved", "bytes": size}

    @router.post("/restore", response_model=SessionInfo)
    async def restore(body: SessionRestoreRequest, owner=Depends(auth)):
        path = path_for(body.session_id)
        if not path.is_file():
            raise APIError(404, f"session_id: no saved session {body.session_id!r}", "not_found_error", "session_id")
        return await call(lambda e: session_info(e.restore_session(str(path), body.session_id, owner)))

    return router


def _check_id(session_id: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}", session_id):
        raise APIError(400, "session_id: 1 to 128 characters of A-Z a-z 0-9 . _ : - (not starting with '.')",
                       param="session_id")
