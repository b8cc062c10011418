"""The rollout's admin routes (scope ``admin``): ``POST /v1/admin/canary`` starts a canary or shadow, or aborts
one; ``GET /v1/admin/rollout`` its state and the check that decided it; ``GET /v1/admin/probes`` the stable
bundle's probe set as ``.npz`` (deploy/probes.py)."""
from __future__ import annotations

import json
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request, Security
from fastapi.responses import JSONResponse, Response

from safedl.deploy.probes import probes_npz
from safedl.serve.http import AuditedRoute, authorized, context_of, finite, read_body
from safedl.serve.keys import ApiKey
from safedl.serve.request import ApiError
from safedl.serve.schemas import ErrorResponse
from safedl.serve.swap import SwapRefused

MAX_BODY = 4096
_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 408, 409, 422, 429, 503)}
USAGE = ('send {"path": "<bundle directory>", "fraction": 0.1, "mode": "canary" | "shadow"} or '
         '{"action": "abort"}')


def _body(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "bad_request", USAGE) from None
    if not isinstance(doc, dict):
        raise ApiError(400, "bad_request", USAGE)
    unknown = sorted(set(doc) - {"path", "fraction", "mode", "action"})
    if unknown:
        raise ApiError(400, "bad_request", f"unknown field(s) {', '.join(unknown)}; {USAGE}")
    if doc.get("action") not in (None, "abort"):
        raise ApiError(400, "bad_request", f'"action": {doc["action"]!r}; {USAGE}')
    if doc.get("action") is None:
        if not isinstance(doc.get("path"), str) or not doc["path"].strip():
            raise ApiError(400, "bad_request", f'"path": {doc.get("path")!r}; {USAGE}')
        f = doc.get("fraction")
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1):
            raise ApiError(400, "bad_request", f'"fraction": {f!r}: must be a number in (0, 1]')
        if doc.get("mode", "canary") not in ("canary", "shadow"):
            raise ApiError(400, "bad_request", f'"mode": {doc.get("mode")!r}: choose canary or shadow')
    return doc


def rollout_router() -> APIRouter:
    router = APIRouter(route_class=AuditedRoute)

    @router.post("/v1/admin/canary", responses=_ERRORS, summary="Start a canary or shadow, or abort it (admin)")
    async def admin_canary(request: Request, key: ApiKey = Security(authorized("admin"))) -> JSONResponse:
        svc, ctx = request.app.state.service, context_of(request)
        doc = _body(await read_body(request, limit=MAX_BODY, config=svc.config))
        who = {"request_id": ctx.request_id, "key_id": ctx.key_id, "trigger": "http"}

        def work() -> dict:
            if doc.get("action") == "abort":
                return svc.rollout.abort(ctx=who)
            return svc.rollout.begin(doc["path"], mode=doc.get("mode", "canary"), fraction=doc.get("fraction"),
                                     ctx=who)
        try:
            return JSONResponse(finite(await to_thread.run_sync(work)))
        except SwapRefused as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None

    @router.get("/v1/admin/rollout", responses=_ERRORS, summary="The canary's rollout state (scope admin)")
    async def admin_rollout(request: Request, key: ApiKey = Security(authorized("admin"))) -> JSONResponse:
        return JSONResponse(finite(request.app.state.service.rollout.status()))

    @router.get("/v1/admin/probes", responses=_ERRORS, summary="The bundle's labelled probe set, .npz (admin)")
    async def admin_probes(request: Request, key: ApiKey = Security(authorized("admin"))) -> Response:
        b = request.app.state.service.bundle
        if b.probes is None:
            raise ApiError(404, "no_probes", f"bundle {b.version} has no probe set (export it again with --probes N)")
        body = await to_thread.run_sync(probes_npz, b.probes)
        return Response(body, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="probes-{b.version}.npz"',
                                 "X-Bundle-Version": b.version})

    return router
