"""What one request carries through the service: its typed context and the error that ends it.

``RequestContext`` is created when a request reaches a route, before any dependency runs, and is filled in as the
request goes: the key that authenticated it (``key_id`` is set the moment a valid key is presented, so a 403, a
429 or a bad body from that key is audited under it), the per-image audit fields, the bundle version that decided
it and where the time went (``stages_ms``). ``ApiError`` is every refusal: an HTTP status, a machine-readable code
and a message for the client.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

# Statuses of requests that no valid key stands behind: counted and audited in aggregate per client address
# (serve/unauth.py), never one audit row each, so keyless traffic cannot flood the audit log.
UNAUTHENTICATED = "unauthenticated"
CONTEXT_STATE = "safedl_ctx"  # the RequestContext in the ASGI scope's "state" (Starlette's request.state)


def context_in(scope: dict) -> "RequestContext | None":
    """The RequestContext a route stored in this ASGI scope, if any (read by the protocol after the answer)."""
    state = scope.get("state")
    return state.get(CONTEXT_STATE) if isinstance(state, dict) else None


def presented_token(*, authorization: str | None, x_api_key: str | None) -> str | None:
    """The key a request presents: ``Authorization: Bearer <key>`` (another scheme presents none) or
    ``X-API-Key: <key>``."""
    if authorization is not None:
        scheme, _, value = authorization.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None
    return x_api_key


class ApiError(Exception):
    """A refusal: ``status`` (4xx/5xx), ``code`` (machine-readable), ``message`` (for the client), ``headers``.

    ``close``: the connection is closed after the answer (a body that was not read, a timed-out upload)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None, *,
                 close: bool = False):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})
        if close:
            self.headers["Connection"] = "close"


@dataclass
class RequestContext:
    """The typed state of one request (one per request; only its own handler touches it)."""

    endpoint: str
    method: str
    client: str | None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    ts: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.perf_counter)
    key_id: str | None = None
    tier: str | None = None
    authenticated: bool = False          # a valid key was presented (even if then refused: scope, limits)
    bundle_version: str | None = None    # the bundle that decided (set by the answer)
    input_sha256: list[str] = field(default_factory=list)
    audit_fields: list[dict[str, Any]] = field(default_factory=list)  # one dict per image
    audited: bool = False                # a worker thread already committed the rows
    audit_error: Exception | None = None
    stages_ms: dict[str, float] = field(default_factory=dict)
    _last: float = 0.0

    def __post_init__(self) -> None:
        self._last = self.t0

    def mark(self, stage: str) -> None:
        """Record the time spent since the previous stage (the request log's ``stages_ms``)."""
        now = time.perf_counter()
        self.stages_ms[stage] = round((now - self._last) * 1000.0, 3)
        self._last = now

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.t0

    def error_body(self, code: str, message: str) -> dict[str, Any]:
        return {"error": {"code": code, "message": message, "request_id": self.request_id}}
