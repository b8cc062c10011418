"""The ASGI layer in front of every route: strict request framing, the client's address, security headers.

- Framing: a request with both ``Content-Length`` and ``Transfer-Encoding``, with more than one ``Content-Length``
  (or a comma list in one), or with a ``Transfer-Encoding`` other than ``chunked`` is answered 400 and the connection
  closed: two parsers (a proxy and this server) could read its body differently (request smuggling, RFC 9112 6.3).
- Client address: the peer's address, unless the peer is a trusted proxy (``trusted_proxies``, default none):
  then the right-most address of ``X-Forwarded-For`` that is not itself a trusted proxy. A client can put anything in
  that header, so it is never read from any other peer.
- Early refusal: a request to a keyed route whose token cannot be a live key (``early``, the service's
  ``refuse_early``) is answered here, before routing, dependency resolution or any thread hop: a keyless flood costs
  the service a header parse and a dictionary lookup per request.
- Headers on every response: ``nosniff``, ``no-store``, no framing, no referrer, and a Content-Security-Policy that
  allows nothing (JSON needs nothing; the dashboard sets its own, stricter-than-default policy for its page).
"""
from __future__ import annotations

import ipaddress
import json
import logging
import uuid
from typing import Any, Callable

from safedl.serve.connection_limits import IPNetwork
from safedl.serve.request import ApiError, presented_token

log = logging.getLogger("safedl.serve")
CLIENT_KEY = "safedl.client"
SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store"),
                    (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"),
                    (b"cross-origin-resource-policy", b"same-origin"),
                    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"))


def client_of(scope: dict) -> str | None:
    """The client address the edge resolved for this request (the peer's when no edge ran, as in unit tests)."""
    if CLIENT_KEY in scope:
        return scope[CLIENT_KEY]
    peer = scope.get("client")
    return peer[0] if peer else None


def _trusted(address: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return False
    return any(ip in n for n in networks)


def resolve_client(peer: str | None, forwarded_for: list[str], trusted: tuple[IPNetwork, ...]) -> str | None:
    """The client of a request from ``peer`` with these ``X-Forwarded-For`` header values."""
    if peer is None or not trusted or not _trusted(peer, trusted):
        return peer
    hops = [h.strip() for v in forwarded_for for h in v.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # a garbled hop: the proxy's own address is the best we know
    return hops[0] if hops else peer


def framing_error(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why this request's framing is ambiguous (then answer 400), or None."""
    lengths = [v for k, v in headers if k == b"content-length"]
    encodings = [v for k, v in headers if k == b"transfer-encoding"]
    if len(lengths) > 1 or any(b"," in v for v in lengths):
        return "more than one Content-Length"
    if lengths and encodings:
        return "both Content-Length and Transfer-Encoding"
    if encodings and (len(encodings) > 1 or encodings[0].strip().lower() != b"chunked"):
        return "a Transfer-Encoding other than chunked"
    return None


def raw_head_framing_error(head: bytes) -> str | None:
    """``framing_error`` of a raw request head (request line and header lines, before any parser): the HTTP parser
    folds a repeated identical Content-Length into one, so repeats are only visible here."""
    headers = []
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            headers.append((name.strip().lower(), value.strip()))
    return framing_error(headers)


class EdgeMiddleware:
    """Pure ASGI middleware (no body buffering): framing check, client address, early refusal, security headers.

    ``on_refused(client, reason)`` is called for every request refused for its framing (counted as a failure
    before authentication); ``early(token=, client=, endpoint=)`` returns the ApiError of a request to one of
    ``keyed_paths`` that must not reach its route, or None."""

    def __init__(self, app: Any, *, trusted_proxies: tuple[IPNetwork, ...] = (),
                 on_refused: Callable[[str | None, str], None] | None = None,
                 early: Callable[..., ApiError | None] | None = None, keyed_paths: frozenset[str] = frozenset()):
        self.app, self.trusted, self.on_refused = app, tuple(trusted_proxies), on_refused
        self.early, self.keyed_paths = early, keyed_paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or []
        peer = scope.get("client")
        scope[CLIENT_KEY] = resolve_client(peer[0] if peer else None,
                                           [v.decode("latin-1") for k, v in headers if k == b"x-forwarded-for"],
                                           self.trusted)
        problem = framing_error(headers)

        async def send_secured(message: dict) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *((k, v) for k, v in SECURITY_HEADERS if k not in have)]}
            await send(message)

        if problem is not None:
            if self.on_refused is not None:
                self.on_refused(scope[CLIENT_KEY], "bad_framing")
            await _plain(send_secured, ApiError(400, "bad_framing", f"ambiguous request framing: {problem}",
                                                close=True))
            return
        if self.early is not None and scope.get("path") in self.keyed_paths:
            refusal = self.early(token=_token(headers), client=scope[CLIENT_KEY], endpoint=scope["path"])
            if refusal is not None:
                if any(k in (b"content-length", b"transfer-encoding") and v not in (b"0", b"") for k, v in headers):
                    refusal.headers["Connection"] = "close"  # the body is never read: discarded, then closed
                await _plain(send_secured, refusal)
                return
        await self.app(scope, receive, send_secured)


def _token(headers: list[tuple[bytes, bytes]]) -> str | None:
    found = {k: v.decode("latin-1") for k, v in headers if k in (b"authorization", b"x-api-key")}
    return presented_token(authorization=found.get(b"authorization"), x_api_key=found.get(b"x-api-key"))


async def _plain(send: Callable, exc: ApiError) -> None:
    """Answer ``exc`` as the routes would (the same error body), without routing."""
    request_id = uuid.uuid4().hex
    data = json.dumps({"error": {"code": exc.code, "message": exc.message, "request_id": request_id}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
               (b"x-request-id", request_id.encode()),
               *((k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in exc.headers.items())]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
