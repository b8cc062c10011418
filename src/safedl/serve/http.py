"""The HTTP rules every route follows: authentication from the headers before the body, bounded body reading, and
audit before answer.

- ``authorized(scope)`` is a FastAPI ``Security`` dependency (so the bearer and ``X-API-Key`` schemes show in the
  OpenAPI document): it resolves the key, its scope, the monitor's key actions and the request token bucket before
  the endpoint reads one byte of the body. A refused request is answered with ``Connection: close``: its body is
  never read, and the server half-closes and discards what the client still sends (serve/protocol.py).
- ``read_body`` reads under a byte cap (413) and a deadline (408: ``body_timeout_s`` in all, and after
  ``body_grace_s`` at least ``min_body_bytes_per_s`` on average), and tells a client that went away (499) from a
  server fault.
- ``AuditedRoute`` wraps every endpoint: it creates the ``RequestContext`` before the dependencies run, turns any
  ``ApiError`` into its answer, commits the audit rows (one per image) before the answer leaves, answers 503 if they
  cannot be committed, and counts and logs the request. Failures before authentication are not audited one row each:
  they are counted per client address in aggregate (serve/unauth.py).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Callable

from anyio import to_thread
from fastapi import Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import ClientDisconnect

from safedl.serve.audit import AuditUnavailable
from safedl.serve.edge import client_of
from safedl.serve.keys import ApiKey
from safedl.serve.request import CONTEXT_STATE, ApiError, RequestContext, presented_token

log = logging.getLogger("safedl.serve")
_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer sdl_<id>_<secret>`")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key, as a header")


def token_of(request: Request) -> str | None:
    """The key a request presents (see ``presented_token``)."""
    return presented_token(authorization=request.headers.get("authorization"),
                           x_api_key=request.headers.get("x-api-key"))


def context_of(request: Request) -> RequestContext:
    return getattr(request.state, CONTEXT_STATE)


def authorized(scope: str) -> Callable[..., Any]:
    """A ``Security`` dependency: the ``ApiKey`` of a request allowed to use ``scope``, resolved from the headers
    before the endpoint reads the body (raises ApiError 401/403/429)."""

    async def dependency(request: Request, _bearer_scheme: HTTPAuthorizationCredentials | None = Security(_bearer),
                         _header_scheme: str | None = Security(_api_key)) -> ApiKey:
        svc, ctx = request.app.state.service, context_of(request)
        token = token_of(request)
        try:  # a token that cannot be a key never gets here: the edge refused it (serve/edge.py)
            return await to_thread.run_sync(svc.admit, token, scope, ctx)
        except ApiError as exc:
            raise _refusal_closes(request, exc) from None

    dependency.__name__ = f"authorized_{scope}"
    return dependency


def _refusal_closes(request: Request, exc: ApiError) -> ApiError:
    """A refusal answered before the body was read closes the connection (the unread body is discarded)."""
    has_body = request.headers.get("transfer-encoding") is not None or request.headers.get("content-length",
                                                                                          "0") not in ("", "0")
    if has_body:
        exc.headers["Connection"] = "close"
    return exc


async def read_body(request: Request, *, limit: int, config: Any) -> bytes:
    """The body, under ``limit`` bytes (413) and the body deadline (408); a client gone mid-body is 499."""
    cl = request.headers.get("content-length")
    if cl is not None:
        if not cl.isdigit():
            raise ApiError(400, "bad_request", "invalid Content-Length header", close=True)
        if int(cl) > limit:
            raise ApiError(413, "body_too_large", f"body of {cl} bytes; at most {limit}", close=True)
    chunks, size, start = [], 0, time.monotonic()
    stream = request.stream().__aiter__()
    while True:
        allowed = min(config.body_timeout_s, config.body_grace_s + size / config.min_body_bytes_per_s)
        try:
            async with asyncio.timeout(max(0.0, start + allowed - time.monotonic())):
                chunk = await stream.__anext__()
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise ApiError(408, "body_timeout", f"the body did not arrive in time ({size} bytes in "
                                                f"{time.monotonic() - start:.1f} s; send at least "
                                                f"{config.min_body_bytes_per_s:.0f} bytes/s, all within "
                                                f"{config.body_timeout_s:g} s)", close=True) from None
        except ClientDisconnect:
            raise ApiError(499, "client_disconnected", "the client closed the connection before the body "
                                                       "was complete") from None
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"body over {limit} bytes", close=True)
        chunks.append(chunk)
    return b"".join(chunks)


def finite(obj: Any) -> Any:
    """NaN/inf (a broken model or detector) become null: strict JSON has no NaN, and the answer must not fail."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def audit_rows(ctx: RequestContext, *, status: int, error: str | None, bundle_version: str) -> list[dict]:
    """The audit rows of one answered request: one per image, or one for the request."""
    base = {"ts": ctx.ts, "request_id": ctx.request_id, "key_id": ctx.key_id, "client": ctx.client,
            "endpoint": ctx.endpoint, "tier": ctx.tier, "http_status": status, "error": error,
            "latency_ms": ctx.elapsed_s() * 1000.0, "bundle_version": ctx.bundle_version or bundle_version}
    return [{**base, **f} for f in ctx.audit_fields] or [base]


class AuditedRoute(APIRoute):
    """The route class of every keyed endpoint: context first, errors to answers, audit before answer."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        inner, endpoint = super().get_route_handler(), self.path

        async def handler(request: Request) -> Response:
            svc = request.app.state.service
            ctx = RequestContext(endpoint=endpoint, method=request.method, client=client_of(request.scope))
            setattr(request.state, CONTEXT_STATE, ctx)
            try:
                response = await inner(request)
                error = None
            except ApiError as exc:
                if exc.status in (400, 408, 413, 415, 422):
                    svc.metrics.input_errors.labels(exc.code).inc()
                response, error = _error_response(ctx, exc), exc.code
            except Exception:  # a bug: log it, audit it, answer 500 without details
                log.exception("request %s failed", ctx.request_id, extra={"request_id": ctx.request_id})
                response = _error_response(ctx, ApiError(500, "internal", "internal error"))
                error = "internal"
            return await _audited(svc, ctx, response, error)

        return handler


def _error_response(ctx: RequestContext, exc: ApiError) -> JSONResponse:
    return JSONResponse(ctx.error_body(exc.code, exc.message), status_code=exc.status, headers=exc.headers)


async def _audited(svc: Any, ctx: RequestContext, response: Response, error: str | None) -> Response:
    """Commit the request's audit rows (unless a worker thread did, or no valid key stands behind it: then it was
    counted in aggregate), then answer; 503 instead if they cannot be committed."""
    status = response.status_code
    try:
        if ctx.audit_error is not None:
            raise ctx.audit_error
        if ctx.authenticated and not ctx.audited:
            rows = audit_rows(ctx, status=status, error=error, bundle_version=svc.bundle.version)
            await asyncio.wrap_future(svc.audit.submit(rows))
        ctx.mark("audit")
    except AuditUnavailable as exc:
        svc.metrics.audit_failures.inc()
        log.error("request %s not answered: audit log unavailable (%s)", ctx.request_id, exc,
                  extra={"event": "audit_failed", "request_id": ctx.request_id})
        response = _error_response(ctx, ApiError(503, "audit_unavailable", "the audit log cannot be written; the "
                                                                           "request was not answered",
                                                 {"Retry-After": "5"}))
        status = 503
    _observe_request(svc, ctx, status)
    response.headers["X-Request-ID"] = ctx.request_id
    return response


def _observe_request(svc: Any, ctx: RequestContext, status: int) -> None:
    elapsed = ctx.elapsed_s()
    svc.metrics.requests.labels(ctx.endpoint, str(status)).inc()
    svc.metrics.latency.labels(ctx.endpoint).observe(elapsed)
    for stage, ms in ctx.stages_ms.items():
        svc.metrics.stage_latency.labels(stage).observe(ms / 1000.0)
    if not ctx.authenticated:  # counted in aggregate; one log line each would be the flood it prevents
        return
    log.info("%s %s %d", ctx.method, ctx.endpoint, status,
             extra={"event": "request", "request_id": ctx.request_id, "key_id": ctx.key_id, "client": ctx.client,
                    "status": status, "latency_ms": round(elapsed * 1000.0, 3), "images": len(ctx.audit_fields),
                    "stages_ms": ctx.stages_ms})
