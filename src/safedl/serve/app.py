"""The FastAPI app: ``create_app(bundle=..., keys=..., audit=...)``.

Every keyed request goes: edge (framing 400, client address, security headers; serve/edge.py) -> key from the
headers, scope, key actions, token bucket (401/403/429, before any body byte is read; serve/http.py) -> the body
under its cap and deadline (413/408) -> declared pixels, decoding, quota (400/413/415/422/429) -> micro-batched
SecurePipeline -> per-key output tier -> audit rows committed -> answer. Any answer, error or not, is audited
first (failures before authentication in aggregate); if the audit cannot be written the answer is 503 instead.
Routes are exact: no redirect on a trailing slash (404), no interactive docs (``/openapi.json`` describes the API).
"""
from __future__ import annotations

import copy
import logging
from contextlib import asynccontextmanager
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, FastAPI, Request, Security
from fastapi.responses import JSONResponse, Response

from safedl.serve.admin import admin_router
from safedl.serve.audit import AuditStore
from safedl.serve.config import ServeConfig
from safedl.serve.dashboard import dashboard_router
from safedl.serve.edge import EdgeMiddleware
from safedl.serve.http import AuditedRoute, authorized, context_of
from safedl.serve.keys import ApiKey, KeyStore
from safedl.serve.metrics import CONTENT_TYPE
from safedl.serve.predict import OPENAPI_BODY, predict
from safedl.serve.review.routes import review_api_router, review_page_router
from safedl.serve.rollout.routes import rollout_router
from safedl.serve.schemas import ErrorResponse, Health, ModelInfo, PredictResponse, Ready
from safedl.serve.service import Service

log = logging.getLogger("safedl.serve")
_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 403, 408, 413, 415, 422, 429, 503)}


def public_manifest(manifest: dict[str, Any], *, admin: bool) -> dict[str, Any]:
    """The manifest a key may see: every component's parameters and fitted state (a detector's ``threshold_``,
    its score scale) only for ``admin`` keys; others see each component's kind and name."""
    if admin or not isinstance(manifest, dict):
        return manifest
    out = copy.deepcopy(manifest)
    out["components"] = [{"kind": c.get("kind"), "name": c.get("name")} for c in manifest.get("components", [])
                         if isinstance(c, dict)]
    return out


def _keyed_routes(svc: Service) -> APIRouter:
    router = APIRouter(route_class=AuditedRoute)

    @router.post("/v1/predict", response_model=PredictResponse, responses=_ERRORS, openapi_extra=OPENAPI_BODY,
                 summary="Classify one or more images through the bundle's SecurePipeline")
    async def predict_route(request: Request, key: ApiKey = Security(authorized("predict"))) -> JSONResponse:
        return JSONResponse(await predict(svc, request, key, context_of(request)))

    @router.get("/v1/model", response_model=ModelInfo, responses=_ERRORS, summary="The bundle manifest and metrics")
    async def model(key: ApiKey = Security(authorized("model"))) -> JSONResponse:
        b = svc.bundle
        return JSONResponse({"bundle_version": b.version, "input_shape": list(svc.shape),
                             "class_names": svc.class_names,
                             "manifest": public_manifest(b.manifest, admin="admin" in key.scopes)})

    @router.get("/metrics", responses=_ERRORS, summary="Prometheus metrics (scope metrics or admin)")
    async def metrics(key: ApiKey = Security(authorized("metrics"))) -> Response:
        return Response(await to_thread.run_sync(svc.metrics.render), media_type=CONTENT_TYPE)

    return router


def _open_routes(svc: Service) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/health", response_model=Health, summary="Liveness")
    async def health() -> dict:
        return {"status": "ok"}

    @router.get("/v1/ready", response_model=Ready, responses={503: {"model": Ready}}, summary="Readiness")
    async def ready() -> Response:
        problems = svc.problems()
        svc.metrics.ready.set(0 if problems else 1)
        return JSONResponse({"ready": not problems, "bundle_version": svc.bundle.version, "problems": problems},
                            status_code=503 if problems else 200)

    return router


def create_app(*, bundle: Any, keys: KeyStore, audit: AuditStore, config: ServeConfig | None = None,
               monitor_config: Any = None) -> FastAPI:
    """The service for a loaded, verified ``bundle`` (``.pipeline``, ``.manifest``, ``.version``); with
    ``monitor_config`` (a validated ``MonitorConfig``) the security monitor watches every predict batch."""
    config = config or ServeConfig()
    svc = Service(bundle=bundle, keys=keys, audit=audit, config=config, monitor_config=monitor_config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await to_thread.run_sync(svc.start)
        svc.metrics.ready.set(0 if svc.problems() else 1)
        log.info("serving bundle %s (%s)", svc.bundle.version, "x".join(map(str, svc.shape)),
                 extra={"event": "start", "bundle_version": svc.bundle.version, "problems": svc.problems()})
        try:
            yield
        finally:  # in-flight requests have finished (uvicorn waits for them); flush the model queue, then the audit
            svc.stop()
            log.info("stopped; audit flushed", extra={"event": "stop"})

    app = FastAPI(title="safedl serve", version="1", lifespan=lifespan, redirect_slashes=False, docs_url=None,
                  redoc_url=None, description="A verified safedl bundle's defended model behind API keys, rate "
                                              "limits and an audit log.")
    app.state.service = svc
    keyed_routers = (_keyed_routes(svc), admin_router(), review_api_router(), rollout_router())
    for router in keyed_routers:
        app.include_router(router)
    app.include_router(_open_routes(svc))
    app.include_router(dashboard_router())  # /dashboard: the on-call page (its data: /v1/monitor/summary, admin)
    app.include_router(review_page_router())  # /review: the review queue (its data: /v1/review, admin)

    def refused_at_edge(client: str | None, code: str) -> None:
        svc.unauth.failed(client, endpoint="(edge)", code=code)
        svc.metrics.unauthenticated.labels(code).inc()

    def early(*, token: str | None, client: str | None, endpoint: str) -> Any:
        refusal = svc.refuse_early(token=token, client=client, endpoint=endpoint)
        if refusal is not None:
            svc.metrics.requests.labels(endpoint, str(refusal.status)).inc()
        return refusal

    keyed = frozenset(route.path for router in keyed_routers for route in router.routes)
    app.add_middleware(EdgeMiddleware, trusted_proxies=config.trusted_proxies, on_refused=refused_at_edge,
                       early=early, keyed_paths=keyed)
    return app
