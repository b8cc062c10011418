"""The admin routes (scope ``admin``): bundle swap and rollback (serve/swap.py does the work), the security
monitor's summary."""
from __future__ import annotations

import json
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request, Security
from fastapi.responses import JSONResponse

from safedl.serve.http import AuditedRoute, authorized, context_of, finite, read_body
from safedl.serve.keys import ApiKey
from safedl.serve.request import ApiError
from safedl.serve.stores.engine import StoreUnavailable
from safedl.serve.schemas import ErrorResponse
from safedl.serve.swap import SwapRefused

MAX_SWAP_BODY = 4096
_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 408, 409, 422, 429, 503)}


def _swap_path(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(400, "bad_request", 'send a JSON body {"path": "<bundle directory>"}') from None
    path = doc.get("path") if isinstance(doc, dict) else None
    if not isinstance(path, str) or not path.strip():
        raise ApiError(400, "bad_request", f'"path": {path!r}; send {{"path": "<bundle directory>"}}')
    return path


async def _swapped(work: Any) -> JSONResponse:
    try:
        return JSONResponse(await to_thread.run_sync(work))
    except SwapRefused as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None


def admin_router() -> APIRouter:
    router = APIRouter(route_class=AuditedRoute)

    @router.post("/v1/admin/bundle", responses=_ERRORS,
                 summary="Verify a bundle and swap to it without downtime (scope admin)")
    async def admin_bundle(request: Request, key: ApiKey = Security(authorized("admin"))) -> JSONResponse:
        svc, ctx = request.app.state.service, context_of(request)
        path = _swap_path(await read_body(request, limit=MAX_SWAP_BODY, config=svc.config))
        return await _swapped(lambda: svc.swapper.swap_to(path, ctx={"request_id": ctx.request_id,
                                                                      "key_id": ctx.key_id}))

    @router.post("/v1/admin/rollback", responses=_ERRORS, summary="Swap back to the previous bundle (scope admin)")
    async def admin_rollback(request: Request, key: ApiKey = Security(authorized("admin"))) -> JSONResponse:
        svc, ctx = request.app.state.service, context_of(request)
        return await _swapped(lambda: svc.swapper.rollback(ctx={"request_id": ctx.request_id, "key_id": ctx.key_id}))

    @router.get("/v1/monitor/summary", responses=_ERRORS, summary="Security monitor snapshot (scope admin)")
    async def monitor_summary(request: Request, key: ApiKey = Security(authorized("admin"))) -> JSONResponse:
        svc = request.app.state.service
        if svc.monitor is None:
            raise ApiError(404, "monitor_off", "the security monitor is off; start the service with "
                                               "--monitor-config FILE")
        try:
            return JSONResponse(finite(await to_thread.run_sync(svc.monitor.snapshot)))
        except StoreUnavailable as exc:  # the alert store (audit database) cannot answer: fail closed, not 500
            raise ApiError(503, "store_unavailable", f"the monitor's alert store is unavailable ({exc})",
                           {"Retry-After": "5"}) from None

    return router
