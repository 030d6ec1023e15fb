"""A small synchronous client for the GoldFinch endpoints that the `openai` package does not cover.

Completions and chat go through `openai` (or any OpenAI client); this covers the rest of the
server: health, models, tokenization, sessions and Prometheus metrics. Every failure surfaces as
one exception type, `GoldFinchError`, built from OpenAI's error body, so callers handle a missing
session, a wrong key or a server that is down the same way.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_TIMEOUT_S = 60.0


class GoldFinchError(Exception):
    """An API error as the server described it (OpenAI's `{"error": {...}}` body).

    `status` is the HTTP status, or 0 when no response came back (connection refused, timeout):
    callers can then tell "the server said no" from "the server is not there".
    """

    def __init__(self, status: int, type: str, message: str, param: str | None = None,
                 code: str | int | None = None) -> None:  # noqa: A002 - OpenAI's field name
        super().__init__(f"{status} {type}: {message}" if status else f"{type}: {message}")
        self.status, self.type, self.message, self.param, self.code = status, type, message, param, code

    @classmethod
    def from_response(cls, response: httpx.Response) -> "GoldFinchError":
        """Reads OpenAI's error body; a proxy's HTML or plain-text error still gives a useful message."""
        try:
            error = response.json().get("error")
        except (ValueError, AttributeError):
            error = None
        if not isinstance(error, dict):
            text = response.text.strip()[:500] or response.reason_phrase
            return cls(response.status_code, "http_error", text)
        return cls(response.status_code, str(error.get("type") or "api_error"), str(error.get("message") or ""),
                   error.get("param"), error.get("code"))


def server_root(base_url: str) -> str:
    """The server's root URL. Users paste the OpenAI base URL (".../v1") as often as the root, and
    /health, /metrics and /tokenize live at the root, so both forms are accepted."""
    url = base_url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if "://" not in url:
        url = "http://" + url
    return url


class GoldFinchClient:
    """`GoldFinchClient("http://127.0.0.1:8000")`; usable as a context manager to close its connections."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = server_root(base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    # ---- plumbing ------------------------------------------------------------------------------
    def _request(self, method: str, path: str, json: Any = None) -> httpx.Response:
        try:
            response = self._http.request(method, path, json=json)
        except httpx.TimeoutException as exc:
            raise GoldFinchError(0, "timeout", f"{method} {path}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise GoldFinchError(0, "connection_error", f"{method} {path}: {exc}") from exc
        if response.status_code >= 400:
            raise GoldFinchError.from_response(response)
        return response

    def _json(self, method: str, path: str, json: Any = None) -> Any:
        response = self._request(method, path, json)
        try:
            return response.json()
        except ValueError as exc:
            raise GoldFinchError(response.status_code, "invalid_response",
                                 f"{method} {path}: the body is not JSON") from exc

    @staticmethod
    def _session_path(session_id: str, suffix: str = "") -> str:
        # ids are restricted server-side; quoting still keeps a stray "/" or "?" from changing the route
        return f"/v1/sessions/{quote(session_id, safe='')}{suffix}"

    # ---- server --------------------------------------------------------------------------------
    def health(self) -> bool:
        """True when the server answers /health with 200 (model loaded, engine alive). Never raises:
        a health probe should answer "no" rather than crash the caller's wait loop."""
        try:
            return self._http.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    def models(self) -> list[dict]:
        """The model cards of /v1/models (`id`, `max_model_len`, ...)."""
        return list(self._json("GET", "/v1/models").get("data", []))

    def tokenize(self, text: str) -> list[int]:
        return list(self._json("POST", "/tokenize", {"prompt": text})["tokens"])

    def detokenize(self, ids: list[int]) -> str:
        return str(self._json("POST", "/detokenize", {"tokens": list(ids)})["prompt"])

    # ---- sessions ------------------------------------------------------------------------------
    def create_session(self, session_id: str | None = None) -> dict:
        """Opens a session (the server picks an unguessable id when none is given); an existing
        session of the same key is returned as it is, so retrying a create is harmless."""
        return self._json("POST", "/v1/sessions", {"session_id": session_id} if session_id else {})

    def get_session(self, session_id: str) -> dict:
        """`num_tokens` (tokens its state covers), `location` (device/host/empty), `busy`."""
        return self._json("GET", self._session_path(session_id))

    def close_session(self, session_id: str) -> dict:
        """Frees the session's cache on the server; 404 if it is unknown (or another key's)."""
        return self._json("DELETE", self._session_path(session_id))

    def save_session(self, session_id: str) -> dict:
        """Writes the session to the server's --session-dir; returns `{"bytes": size, ...}`."""
        return self._json("POST", self._session_path(session_id, "/save"))

    def restore_session(self, session_id: str) -> dict:
        """Loads a session saved under this id back into the server (into host memory)."""
        return self._json("POST", "/v1/sessions/restore", {"session_id": session_id})

    # ---- metrics -------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Samples of /metrics, keyed `name` or `name{label=value,...}` (labels sorted).

        The `model_name` label is left out of the key: a server serves one model, and keys that do
        not depend on its name are what dashboards and tests want to look up. Samples that differ
        only in that label (a proxy in front of several servers) are summed.
        """
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[str, float] = {}
        for family in text_string_to_metric_families(self._request("GET", "/metrics").text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
                key = sample.name + (f"{{{labels}}}" if labels else "")
                out[key] = out.get(key, 0.0) + float(sample.value)
        return out

    # ---- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "GoldFinchClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
