"""Sessions on disk, for `LLMEngine` (a mixin: it reads the engine's sessions, cache, model and
`model_fingerprint`): a session's state written to a file and read back (`engine.session_file`)."""
from __future__ import annotations

import hashlib
import json

from .session_file import RNN_KEYS, load_session, save_session
from .sessions import Session, SessionError


class SessionFiles:
    def save_session(self, session_id: str, path: str, owner: str | None = None) -> int:
        """Writes a session's state to a file (see engine.session_file); returns its size."""
        session = self.sessions.get(session_id, owner)
        if session.busy:
            raise SessionError(f"session_id: session {session_id!r} is in use by a running request")
        n = len(session.token_ids)
        if session.on_device:
            copy = self.cache.host_copy_of(session, n)
        elif session.host_copy is not None:
            copy = session.host_copy
        else:
            raise SessionError(f"session_id: session {session_id!r} holds no state yet")
        return save_session(path, session, copy, self.model_fingerprint)

    def restore_session(self, path: str, session_id: str | None = None, owner: str | None = None) -> Session:
        """Reads a session file (validated as a whole) into host memory under `session_id` (the
        id saved in the file by default); it moves to the device when a request resumes it."""
        rnn = self.cache.rnn
        shapes = {k: tuple(getattr(rnn, k)[:, 0].shape) for k in RNN_KEYS}
        meta, copy = load_session(path, self.model_fingerprint, shapes, self.model.config.compressed_dim)
        if meta.get("owner") and meta["owner"] != owner:  # another key's file reads as missing
            raise SessionError(f"session_id: no session {session_id or meta.get('session_id')!r}")
        dtype = self.model.dtype
        copy.compressed_keys = copy.compressed_keys.to(dtype)
        copy.rnn_state["tmix_shift"] = copy.rnn_state["tmix_shift"].to(dtype)
        copy.rnn_state["cmix_shift"] = copy.rnn_state["cmix_shift"].to(dtype)
        sid = session_id or meta.get("session_id") or None
        if sid in self.sessions:
            self.sessions.get(sid, owner)  # another key's session cannot be overwritten
        session = Session(session_id=sid or self.sessions.open(owner=owner).session_id, owner=owner,
                          token_ids=meta["token_ids"], host_copy=copy)
        self.sessions.adopt(session)
        return session


def fingerprint(model) -> str:
    """Identifies the weights a session's state belongs to (config and a sample of the weights)."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for t in (model.emb, model.head, model.w_compress):
        h.update(t.flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]
