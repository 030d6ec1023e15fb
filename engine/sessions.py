"""Sessions: a finished conversation's state kept so that the next turn prefills only new tokens.

A session holds the state after `token_ids` (RNN state and compressed keys): on the device (a state
slot and blocks, handed over from the finished sequence without a copy) while there is room, in host
memory under pressure (least recently used first), and is dropped by `close` or when the host-memory
budget is exceeded. A request whose prompt strictly extends the session's tokens resumes from it;
any other prompt starts fresh and the stale state is discarded (never a wrong reuse).
"""
from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from .cache_manager import CacheManager
from .sequence import HostCopy, Sequence


class SessionError(ValueError):
    """A session request that cannot be served (unknown id, busy, wrong owner); names the session."""


@dataclass(eq=False)
class Session:
    session_id: str
    owner: str | None = None  # the API key scope that created it; None = unscoped
    token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    state_slot: int | None = None
    host_copy: HostCopy | None = None
    busy: bool = False  # a request is resuming from it / running on it
    absorbing: bool = False  # its last request finished; the final token is being fed in
    last_used: float = field(default_factory=time.monotonic)
    created: float = field(default_factory=time.time)

    @property
    def num_computed_tokens(self) -> int:
        """Tokens the state it holds now covers."""
        return len(self.token_ids) if (self.state_slot is not None or self.host_copy is not None) else 0

    @property
    def covered_tokens(self) -> int:
        """Tokens its state covers, counting a finished request's state still being absorbed."""
        return len(self.token_ids) if self.absorbing else self.num_computed_tokens

    @property
    def on_device(self) -> bool:
        return self.state_slot is not None

    @property
    def location(self) -> str:
        if self.on_device or self.absorbing:  # absorbing: its finishing sequence holds it on the device
            return "device"
        return "host" if self.host_copy is not None else "empty"

    def host_bytes(self) -> int:
        if self.host_copy is None:
            return 0
        c = self.host_copy
        tensors = [c.compressed_keys, c.token_ids, *c.rnn_state.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


class SessionStore:
    def __init__(self, cache: CacheManager, host_budget_bytes: int, max_sessions: int = 10_000) -> None:
        self.cache = cache
        self.host_budget_bytes = host_budget_bytes
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # LRU order, oldest first
        self.num_evicted_to_host = 0
        self.num_dropped = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def device_owners(self) -> list[Session]:
        return [s for s in self._sessions.values() if s.on_device]

    def host_bytes(self) -> int:
        return sum(s.host_bytes() for s in self._sessions.values())

    # ---- lifecycle ---------------------------------------------------------------------------------
    def open(self, session_id: str | None = None, owner: str | None = None) -> Session:
        """Creates an empty session; a server-generated id is unguessable (128 random bits)."""
        if session_id is None:
            session_id = "sess-" + secrets.token_urlsafe(16)
        elif session_id in self._sessions:
            self.get(session_id, owner)  # raises if it belongs to someone else
            return self._sessions[session_id]
        if len(self._sessions) >= self.max_sessions:
            self._drop_lru(lambda s: not s.busy)
        session = Session(session_id=session_id, owner=owner)
        self._sessions[session_id] = session
        return session

    def get(self, session_id: str, owner: str | None = None) -> Session:
        session = self._sessions.get(session_id)
        # a session of another key reads exactly like a missing one: no existence oracle
        if session is None or (session.owner is not None and session.owner != owner):
            raise SessionError(f"session_id: no session {session_id!r}")
        return session

    def close(self, session_id: str, owner: str | None = None) -> None:
        session = self.get(session_id, owner)
        if session.busy:
            raise SessionError(f"session_id: session {session_id!r} is in use by a running request")
        self._discard_state(session)
        del self._sessions[session_id]

    # ---- resuming and storing ----------------------------------------------------------------------
    def claim(self, session: Session, prompt_token_ids: list[int]) -> int:
        """Marks the session busy for a new request; returns how many prompt tokens its state
        covers (0 when the prompt does not strictly extend them: the old state is discarded)."""
        if session.busy:
            raise SessionError(f"session_id: session {session.session_id!r} is in use by a running request")
        session.busy = True
        self._touch(session)
        n = session.covered_tokens
        if n and len(prompt_token_ids) > n and prompt_token_ids[:n] == session.token_ids:
            return n
        if session.absorbing:  # the state in flight will be stale: drop it when it lands
            session.token_ids = []
        else:
            self._discard_state(session)
        return 0

    def begin_absorb(self, session: Session, seq: Sequence) -> None:
        """The session's request finished: its state will cover every token of the sequence once
        the last sampled token has been fed through the model (see LLMEngine)."""
        session.busy, session.absorbing = False, True
        session.token_ids = seq.all_token_ids()
        self._touch(session)

    def end_absorb(self, session: Session, seq: Sequence) -> None:
        """Takes over the sequence's state, unless a new request has since discarded it."""
        session.absorbing = False
        if session.token_ids != seq.all_token_ids()[: seq.num_computed_tokens]:
            self.cache.free(seq)  # a non-extending prompt claimed the session meanwhile
            seq.host_copy = None
            session.token_ids = []
            return
        self._take_state(session, seq)

    def release(self, session: Session, seq: Sequence | None) -> None:
        """Takes over the finished (or cancelled) sequence's state; None just unmarks it busy."""
        session.busy = False
        self._touch(session)
        if seq is None:
            return
        self._discard_state(session)
        if seq.gold_lags:  # cancelled between prompt chunks: a follow-up could not continue it exactly
            self.cache.free(seq)
            seq.host_copy = None
            return
        session.token_ids = seq.all_token_ids()[: seq.num_computed_tokens]
        self._take_state(session, seq)

    def _take_state(self, session: Session, seq: Sequence) -> None:
        if seq.state_slot is not None:
            self.cache.transfer(seq, session)
        elif seq.host_copy is not None:
            session.host_copy, seq.host_copy = seq.host_copy, None
        else:
            session.token_ids = []
        self.enforce_host_budget()

    # ---- memory pressure -----------------------------------------------------------------------------
    def make_room(self) -> bool:
        """Moves the least recently used device-resident session to host memory. Returns False
        when none is left on the device."""
        for session in list(self._sessions.values()):
            if session.on_device:
                session.host_copy = self.cache.to_host(session, len(session.token_ids))
                self.num_evicted_to_host += 1
                self.enforce_host_budget()
                return True
        return False

    def enforce_host_budget(self) -> None:
        while self.host_bytes() > self.host_budget_bytes:
            if not self._drop_lru(lambda s: s.host_copy is not None and not s.busy):
                return

    def _drop_lru(self, eligible) -> bool:
        for sid, session in self._sessions.items():
            if eligible(session):
                self._discard_state(session)
                del self._sessions[sid]
                self.num_dropped += 1
                return True
        return False

    def _discard_state(self, session: Session) -> None:
        if session.on_device or session.block_table:
            self.cache.free(session)
        session.host_copy = None
        session.token_ids = []

    def _touch(self, session: Session) -> None:
        session.last_used = time.monotonic()
        self._sessions.move_to_end(session.session_id)

    def adopt(self, session: Session) -> None:
        """Registers a session restored from disk (host-resident), replacing one of the same id."""
        old = self._sessions.get(session.session_id)
        if old is not None:
            if old.busy:
                raise SessionError(f"session_id: session {session.session_id!r} is in use by a running request")
            self._discard_state(old)
        self._sessions[session.session_id] = session
        self._touch(session)
        self.enforce_host_budget()
