"""The review queue over HTTP (scope ``admin``): ``GET /v1/review`` (queued inputs with thumbnails),
``POST /v1/review/{id}/label`` (``{"label": "attack" | "benign" | CLASS_NAME}``; who labelled is the admin key's
name), and the ``/review`` page (static, like ``/dashboard``: it holds no data and reads the admin key from the URL
fragment or a form; the same Content-Security-Policy)."""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

import torch
from anyio import to_thread
from fastapi import APIRouter, Request, Security
from fastapi.responses import JSONResponse, Response

from safedl.errors import UserError
from safedl.serve.dashboard import HEADERS
from safedl.serve.http import AuditedRoute, authorized, finite, read_body
from safedl.serve.keys import ApiKey
from safedl.serve.monitor.core import thumbnail
from safedl.serve.request import ApiError
from safedl.serve.review.store import STATES, ReviewStore
from safedl.serve.stores.engine import StoreUnavailable

MAX_LABEL_BODY = 1024
MAX_LIST = 200
PAGE = {"": ("review.html", "text/html; charset=utf-8"), "app.js": ("review.js", "text/javascript; charset=utf-8")}
_ERRORS = {s: {"model": dict} for s in (400, 401, 403, 404, 422, 429, 503)}


@lru_cache(maxsize=None)
def _asset(name: str) -> bytes:
    return resources.files("safedl.serve").joinpath("static", PAGE[name][0]).read_bytes()


def _store(request: Request) -> ReviewStore:
    store = request.app.state.service.review
    if store is None:
        raise ApiError(404, "review_off", "the review queue is off; start the service with --review PATH_OR_URL")
    return store


def _listing(store: ReviewStore, state: str, limit: int) -> dict[str, Any]:
    items = store.items(state=state, limit=limit, with_images=True)
    out = []
    for it in items:
        d = it.public()
        d["png_base64"] = thumbnail(torch.from_numpy(it.image))
        d["choices"] = ["attack", "benign", *it.class_names]
        out.append(d)
    return {"items": out, "state": state}


def _label_of(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        doc = None
    label = doc.get("label") if isinstance(doc, dict) else None
    if not isinstance(label, str) or not label:
        raise ApiError(400, "bad_request", 'send a JSON body {"label": "attack" | "benign" | "<class name>"}')
    return label


async def _run(work: Any) -> JSONResponse:
    try:
        return JSONResponse(finite(await to_thread.run_sync(work)))
    except StoreUnavailable as exc:
        raise ApiError(503, "store_unavailable", f"the review queue is unavailable ({exc})",
                       {"Retry-After": "5"}) from None
    except UserError as exc:
        status = 404 if "not in the queue" in str(exc) else 422
        raise ApiError(status, "not_found" if status == 404 else "bad_label", str(exc)) from None


def review_api_router() -> APIRouter:
    """``GET /v1/review`` and ``POST /v1/review/{item_id}/label`` (audited, scope admin)."""
    router = APIRouter(route_class=AuditedRoute)

    @router.get("/v1/review", responses=_ERRORS, summary="The review queue, newest first (scope admin)")
    async def review_list(request: Request, state: str = "unlabelled", limit: int = 50,
                          key: ApiKey = Security(authorized("admin"))) -> JSONResponse:
        store = _store(request)
        if state not in STATES or not 1 <= limit <= MAX_LIST:
            raise ApiError(422, "bad_request", f"state {state!r}, limit {limit}: state is one of "
                                               f"{', '.join(STATES)}, limit 1-{MAX_LIST}")
        return await _run(lambda: _listing(store, state, limit))

    @router.post("/v1/review/{item_id}/label", responses=_ERRORS, summary="Label a queued input (scope admin)")
    async def review_label(request: Request, item_id: int,
                           key: ApiKey = Security(authorized("admin"))) -> JSONResponse:
        store, svc = _store(request), request.app.state.service
        label = _label_of(await read_body(request, limit=MAX_LABEL_BODY, config=svc.config))
        return await _run(lambda: store.label(item_id, label=label, by=f"key:{key.name}").public())

    return router


def review_page_router() -> APIRouter:
    """``/review`` and its script (the style sheet is the dashboard's)."""
    router = APIRouter()

    @router.get("/review", include_in_schema=False)
    async def page() -> Response:
        return Response(_asset(""), media_type=PAGE[""][1], headers=HEADERS)

    @router.get("/review/app.js", include_in_schema=False)
    async def script() -> Response:
        return Response(_asset("app.js"), media_type=PAGE["app.js"][1], headers=HEADERS)

    return router
