"""Optional API keys: several allowed, compared in constant time."""
from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from .errors import APIError


class ApiKeys:
    def __init__(self, keys: list[str]) -> None:
        # compare digests of equal length so neither content nor length leaks through timing
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, request: Request) -> str | None:
        """Returns a stable id of the caller's key (the scope for sessions), or None when keys are
        off; raises 401 for a missing or wrong key."""
        if not self.enabled:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error",
                           code="invalid_api_key")
        digest = hashlib.sha256(token.strip().encode()).digest()
        match = False
        for known in self._digests:
            match |= hmac.compare_digest(digest, known)
        if not match:
            raise APIError(401, "invalid API key", "authentication_error", code="invalid_api_key")
        return digest.hex()[:16]
