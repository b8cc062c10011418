"""The FastAPI app: ``create_app(bundle=..., keys=..., audit=...)``.

Every ``/v1/predict`` request goes: authenticate (401/403) -> token bucket (429) -> read the body under its cap
(413) -> decode and check (400/413/415/422) -> daily quota (429) -> micro-batched SecurePipeline -> per-key output
tier -> audit rows committed -> answer. Any answer, error or not, is audited first; if the audit cannot be written
the answer is 503 instead. The model runs in one worker thread, decoding and SQLite in the thread pool, never on
the event loop.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from safedl.serve.audit import AuditStore, AuditUnavailable
from safedl.serve.batcher import MicroBatcher
from safedl.serve.config import ServeConfig
from safedl.serve.decode import InputError, decode_items, items_from_json, raw_content_type_ok
from safedl.serve.keys import ApiKey, KeyStore, well_formed
from safedl.serve.limits import RateLimiter
from safedl.serve.metrics import CONTENT_TYPE, Metrics
from safedl.serve.monitor.store import KeyActions, KeyBlocked
from safedl.serve.quarantine import Quarantine
from safedl.serve.schemas import ErrorResponse, Health, ModelInfo, PredictResponse, Ready
from safedl.serve.tiers import harden

log = logging.getLogger("safedl.serve")
_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 403, 413, 415, 422, 429, 503)}
_PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "contentEncoding": "base64"}}}}},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    "image/bmp": {"schema": {"type": "string", "format": "binary"}},
    "image/webp": {"schema": {"type": "string", "format": "binary"}},
    "application/x-npy": {"schema": {"type": "string", "format": "binary"}}}}}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class Service:
    """The app's state: bundle, stores, batcher, metrics (one instance per app)."""

    def __init__(self, *, bundle: Any, keys: KeyStore, audit: AuditStore, config: ServeConfig,
                 monitor_config: Any = None):
        self.bundle, self.keys, self.audit, self.config = bundle, keys, audit, config
        self.pipeline = bundle.pipeline
        data = (bundle.manifest or {}).get("data", {}) if isinstance(bundle.manifest, dict) else {}
        shape = getattr(self.pipeline, "input_shape", None) or data.get("shape")
        if not shape or len(shape) != 3:
            raise ValueError("the bundle does not say its input shape (C, H, W); re-export it")
        self.shape = tuple(int(s) for s in shape)
        names = getattr(self.pipeline, "class_names", None) or data.get("class_names")
        self.class_names = [str(n) for n in names] if names else [str(i) for i in range(int(data.get("num_classes", 0)))]
        self.limiter = RateLimiter(keys)
        self.metrics = Metrics()
        self.batcher = MicroBatcher(self._decide, max_batch=config.max_batch,
                                    max_wait_s=config.max_wait_ms / 1000.0, on_batch=self.metrics.batch_size.observe)
        self.actions = KeyActions(keys)  # automatic responses of the monitor, lifted with `safedl keys restore`
        self.monitor = None
        if monitor_config is not None:
            from safedl.serve.monitor.build import build_monitor

            self.monitor = build_monitor(monitor_config, keys=keys, audit_path=audit.path,
                                         registry=self.metrics.registry, num_classes=len(self.class_names),
                                         bundle_version=lambda: self.bundle.version)
        self.quarantine = (Quarantine(config.quarantine_dir, max_bytes=config.quarantine_max_bytes,
                                      retention_days=config.quarantine_retention_days)
                           if config.quarantine_dir is not None else None)

    def _decide(self, x):
        """The pipeline on its own device (decoded images are on the CPU); the answer comes back to the CPU."""
        dev = getattr(self.pipeline, "device", None)
        if dev is None or torch.device(dev).type == "cpu":
            return self.pipeline.decide(x)
        d = self.pipeline.decide(x.to(dev))
        return type(d)(labels=d.labels.cpu(), probs=d.probs.cpu(), rejected=d.rejected.cpu(), reasons=d.reasons,
                       detector_scores={k: v.cpu() for k, v in d.detector_scores.items()}, thresholds=d.thresholds)

    def problems(self) -> list[str]:
        out = []
        if not self.batcher.running:
            out.append("model worker not running")
        if not self.audit.healthy:
            out.append(f"audit log unavailable: {self.audit.last_error}")
        return out

    # -- admission (thread pool) -----------------------------------------------------------------------------
    def admit(self, token: str | None, scope: str) -> ApiKey:
        key = self.keys.authenticate(token)
        if key is None:
            raise ApiError(401, "unauthorized", "missing, unknown or revoked API key "
                                                "(send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>')",
                           {"WWW-Authenticate": "Bearer"})
        if scope not in key.scopes:
            raise ApiError(403, "forbidden", f"this key's scopes ({', '.join(key.scopes)}) do not include {scope!r}")
        try:
            return self.actions.enforce(key)
        except KeyBlocked as exc:
            err = ApiError(403, "key_blocked", str(exc))
            err.key_id = key.key_id  # the refusal is audited under the blocked key
            raise err from None

    def limit(self, key: ApiKey) -> None:
        v = self.limiter.take(key)
        if not v.allowed:
            self.metrics.rate_limited.labels(v.kind).inc()
            what = "rate limit" if v.kind == "rate" else "daily image quota"
            raise ApiError(429, f"{v.kind}_limited", f"{what} exceeded for this key; retry after {v.retry_after_s} s",
                           {"Retry-After": str(v.retry_after_s)})

    def admit_and_decode(self, token: str | None, items: list[bytes], ctx: dict) -> tuple[ApiKey, Any]:
        _mark(ctx, "read")
        key = self.admit(token, "predict")
        ctx["key_id"], ctx["tier"] = key.key_id, key.tier
        self.limit(key)
        _mark(ctx, "admit")
        decoded = self.decode_and_charge(items, key)
        _mark(ctx, "decode")
        return key, decoded

    def decode_and_charge(self, items: list[bytes], key: ApiKey):
        try:
            decoded = decode_items(items, shape=self.shape, config=self.config)
        except InputError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None
        v = self.limiter.charge_images(key, images=decoded.x.shape[0])
        if not v.allowed:
            self.metrics.rate_limited.labels(v.kind).inc()
            raise ApiError(429, "quota_limited", f"daily image quota exceeded for this key; retry after "
                                                 f"{v.retry_after_s} s", {"Retry-After": str(v.retry_after_s)})
        return decoded


def _token(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth is not None:
        scheme, _, value = auth.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None
    return request.headers.get("x-api-key")


async def _read_body(request: Request, limit: int) -> bytes:
    cl = request.headers.get("content-length")
    if cl is not None:
        if not cl.isdigit():
            raise ApiError(400, "bad_request", "invalid Content-Length header")
        if int(cl) > limit:
            raise ApiError(413, "body_too_large", f"body of {cl} bytes; at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"body over {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # lets request.form() parse the bytes already read
    return body


async def _items(request: Request, svc: Service) -> list[bytes]:
    body = await _read_body(request, svc.config.max_body_bytes)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=svc.config.max_images, max_fields=svc.config.max_images,
                                      max_part_size=svc.config.max_body_bytes)
        except HTTPException as exc:
            too_many = "Too many" in str(exc.detail)
            raise ApiError(413 if too_many else 400, "too_many_images" if too_many else "bad_multipart",
                           f"multipart body: {exc.detail}") from None
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        items = [await f.read() for f in files]
        await form.close()
        return items
    if ctype == "application/json":
        try:
            return items_from_json(body, config=svc.config)
        except InputError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None
    if raw_content_type_ok(ctype):
        return [body] if body else []
    raise ApiError(415, "unsupported_media_type", f"Content-Type {ctype or '(none)'!r}; send multipart/form-data, "
                                                  "application/json, image/png|jpeg|bmp|webp or application/x-npy")


def _results(svc: Service, d: dict, decoded, tier: str) -> tuple[list[dict], list[dict]]:
    """(response entries, audit fields) per image, from one request's slice of the Decision."""
    labels, rejected = d["labels"].tolist(), d["rejected"].tolist()
    conf = d["probs"].max(1).values.tolist()
    scores = {k: v.tolist() for k, v in d["detector_scores"].items()}
    shown = harden(d["probs"], tier=tier, decimals=svc.config.round_decimals, k=svc.config.top_k)
    names = svc.class_names
    out, audit = [], []
    for i, lab in enumerate(labels):
        img_scores = {k: float(v[i]) for k, v in scores.items()}
        r = {"index": i, "label": None if rejected[i] else lab, "class_name": None if rejected[i] else names[lab],
             "rejected": bool(rejected[i]), "reason": d["reasons"][i], "probabilities": None, "top_k": None,
             "detector_scores": None, "input_sha256": decoded.sha256[i]}
        if not rejected[i]:
            r.update(shown[i])
            for t in r["top_k"] or []:
                t["class_name"] = names[t["label"]]
        if tier == "full":
            r["detector_scores"] = img_scores
        out.append(r)
        audit.append({"image_index": i, "input_sha256": decoded.sha256[i], "shape": decoded.shapes[i], "label": lab,
                      "class_name": names[lab], "confidence": conf[i], "rejected": bool(rejected[i]),
                      "reason": d["reasons"][i], "detector_scores": img_scores})
    return out, audit


def _observe(svc: Service, d: dict, tier: str) -> None:
    m = svc.metrics
    m.images.inc(len(d["reasons"]))
    m.tier.labels(tier).inc()
    for reason in d["reasons"]:
        if reason is not None:
            m.rejected.labels(reason).inc()
    for name, v in d["detector_scores"].items():
        h = m.detector_score.labels(name)
        for s in v.tolist():
            h.observe(s)


def _quarantine(svc: Service, decoded, audit_fields: list[dict], ctx: dict) -> None:
    q = svc.quarantine
    if q is None:
        return
    for i, a in enumerate(audit_fields):
        if a["rejected"]:
            q.keep(decoded.raw[i], sha256=a["input_sha256"],
                   meta={**{k: ctx[k] for k in ("request_id", "key_id", "client")}, **a, "ts": ctx["ts"]})


def _answer(svc: Service, ctx: dict, key: ApiKey, decoded, d: dict, *, in_thread: bool) -> tuple:
    """The 200 answer to a request from its Decision slice: (status, body, headers, per-image audit fields)."""
    results, audit_fields = _results(svc, d, decoded, key.tier)
    _observe(svc, d, key.tier)
    if svc.monitor is not None:
        ctx["input_sha256"] = decoded.sha256
        svc.monitor.observe(key, decoded.x, d, ctx)
    if svc.quarantine is not None and any(a["rejected"] for a in audit_fields):
        if in_thread:
            _quarantine(svc, decoded, audit_fields, ctx)
        else:
            asyncio.get_running_loop().run_in_executor(None, _quarantine, svc, decoded, audit_fields, dict(ctx))
    body = {"request_id": ctx["request_id"], "bundle_version": svc.bundle.version, "tier": key.tier,
            "results": _finite(results)}
    return 200, body, {}, audit_fields


def _finite(obj: Any) -> Any:
    """NaN/inf (a broken model or detector) become null: strict JSON has no NaN, and the answer must not fail."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _work_in_thread(svc: Service, token: str | None, items: list[bytes], ctx: dict):
    """Admission, decoding and, when the model and the audit writer are idle, the forward pass, the answer and
    its audit commit too: one worker thread, one hand-off. Returns (key, decoded, answer or None)."""
    key, decoded = svc.admit_and_decode(token, items, ctx)
    d = svc.batcher.try_inline(decoded.x)
    if d is None:
        return key, decoded, None
    _mark(ctx, "model")
    answer = _answer(svc, ctx, key, decoded, d, in_thread=True)
    try:
        ctx["audited"] = svc.audit.try_commit_inline(_audit_rows(svc, ctx, *answer))
    except AuditUnavailable as exc:
        ctx["audit_error"] = exc
    return key, decoded, answer


async def _predict(svc: Service, request: Request, ctx: dict) -> tuple[int, dict, dict, list[dict]]:
    """(status, body, headers, per-image audit fields); raises ApiError for refusals.

    A missing or malformed key is refused before the body is read; the rest runs in one thread-pool call when the
    model is idle, else the request joins the next micro-batch.
    """
    token = _token(request)
    if not well_formed(token):
        svc.admit(None, "predict")  # raises the 401
    svc.batcher.expect()
    submitted = False
    try:
        items = await _items(request, svc)
        key, decoded, answer = await anyio.to_thread.run_sync(_work_in_thread, svc, token, items, ctx)
        submitted = True
        if answer is not None:
            return answer
        d = await asyncio.wrap_future(svc.batcher.submit(decoded.x))
        _mark(ctx, "model")
    finally:
        if not submitted:
            svc.batcher.cancel()
    return _answer(svc, ctx, key, decoded, d, in_thread=False)


def _error_body(ctx: dict, code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message, "request_id": ctx["request_id"]}}


def _audit_rows(svc: Service, ctx: dict, status: int, body: dict, headers: dict, fields: list[dict]) -> list[dict]:
    base = {k: ctx.get(k) for k in ("ts", "request_id", "key_id", "client", "endpoint", "tier")}
    base.update(http_status=status, latency_ms=(time.perf_counter() - ctx["t0"]) * 1000.0,
                bundle_version=svc.bundle.version, error=body["error"]["code"] if "error" in body else None)
    return [{**base, **f} for f in fields] or [base]


async def _audited(svc: Service, ctx: dict, status: int, body: dict, headers: dict, fields: list[dict]) -> Response:
    """Commit the audit rows (unless a worker thread already did), then answer; 503 (and no answer) if they cannot
    be committed."""
    try:
        if "audit_error" in ctx:
            raise ctx["audit_error"]
        if not ctx.get("audited"):
            await asyncio.wrap_future(svc.audit.submit(_audit_rows(svc, ctx, status, body, headers, fields)))
        _mark(ctx, "audit")
    except AuditUnavailable as exc:
        svc.metrics.audit_failures.inc()
        log.error("request %s not answered: audit log unavailable (%s)", ctx["request_id"], exc,
                  extra={"event": "audit_failed", "request_id": ctx["request_id"]})
        status, headers = 503, {"Retry-After": "5"}
        body = _error_body(ctx, "audit_unavailable", "the audit log cannot be written; the request was not answered")
    elapsed = time.perf_counter() - ctx["t0"]
    svc.metrics.requests.labels(ctx["endpoint"], str(status)).inc()
    svc.metrics.latency.labels(ctx["endpoint"]).observe(elapsed)
    log.info("%s %s %d", ctx["method"], ctx["endpoint"], status,
             extra={"event": "request", "request_id": ctx["request_id"], "key_id": ctx.get("key_id"),
                    "client": ctx.get("client"), "status": status, "latency_ms": round(elapsed * 1000.0, 3),
                    "images": len(fields), "stages_ms": ctx["stages_ms"]})
    return JSONResponse(body, status_code=status, headers={**headers, "X-Request-ID": ctx["request_id"]})


def _context(request: Request, endpoint: str) -> dict:
    t0 = time.perf_counter()
    return {"request_id": uuid.uuid4().hex, "t0": t0, "ts": time.time(), "endpoint": endpoint,
            "client": request.client.host if request.client else None, "method": request.method,
            "key_id": None, "tier": None, "stages_ms": {}, "_last": t0}


def _mark(ctx: dict, stage: str) -> None:
    """Time spent since the previous stage (in the request log: where the latency goes)."""
    now = time.perf_counter()
    ctx["stages_ms"][stage] = round((now - ctx["_last"]) * 1000.0, 3)
    ctx["_last"] = now


async def _handle(svc: Service, request: Request, endpoint: str, work) -> Response:
    ctx = _context(request, endpoint)
    try:
        status, body, headers, fields = await work(svc, request, ctx)
    except ApiError as exc:
        ctx["key_id"] = ctx["key_id"] or getattr(exc, "key_id", None)
        if exc.status in (400, 413, 415, 422):
            svc.metrics.input_errors.labels(exc.code).inc()
        status, body, headers, fields = exc.status, _error_body(ctx, exc.code, exc.message), exc.headers, []
    except Exception:  # a bug: log it, audit it, answer 500 without details
        log.exception("request %s failed", ctx["request_id"], extra={"request_id": ctx["request_id"]})
        status, body, headers, fields = 500, _error_body(ctx, "internal", "internal error"), {}, []
    return await _audited(svc, ctx, status, body, headers, fields)


async def _model_info(svc: Service, request: Request, ctx: dict) -> tuple[int, dict, dict, list[dict]]:
    key = await anyio.to_thread.run_sync(svc.admit, _token(request), "model")
    ctx["key_id"], ctx["tier"] = key.key_id, key.tier
    body = {"bundle_version": svc.bundle.version, "input_shape": list(svc.shape), "class_names": svc.class_names,
            "manifest": svc.bundle.manifest}
    return 200, body, {}, []


async def _monitor_summary(svc: Service, request: Request, ctx: dict) -> tuple[int, dict, dict, list[dict]]:
    key = await anyio.to_thread.run_sync(svc.admit, _token(request), "admin")
    ctx["key_id"], ctx["tier"] = key.key_id, key.tier
    if svc.monitor is None:
        raise ApiError(404, "monitor_off", "the security monitor is off; start the service with --monitor-config FILE")
    return 200, _finite(await anyio.to_thread.run_sync(svc.monitor.snapshot)), {}, []


def create_app(*, bundle: Any, keys: KeyStore, audit: AuditStore, config: ServeConfig | None = None,
               monitor_config: Any = None) -> FastAPI:
    """The service for a loaded, verified ``bundle`` (``.pipeline``, ``.manifest``, ``.version``); with
    ``monitor_config`` (a validated ``MonitorConfig``) the security monitor watches every predict batch."""
    svc = Service(bundle=bundle, keys=keys, audit=audit, config=config or ServeConfig(), monitor_config=monitor_config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.audit.start()
        svc.batcher.start()
        if svc.monitor is not None:
            svc.monitor.start()
        if svc.quarantine is not None:
            await anyio.to_thread.run_sync(svc.quarantine.prune)
        svc.metrics.ready.set(0 if svc.problems() else 1)
        log.info("serving bundle %s (%s)", svc.bundle.version, "x".join(map(str, svc.shape)),
                 extra={"event": "start", "bundle_version": svc.bundle.version, "problems": svc.problems()})
        try:
            yield
        finally:  # in-flight requests have finished (uvicorn waits for them); flush the model queue, then the audit
            svc.batcher.stop()
            if svc.monitor is not None:
                svc.monitor.close()
            svc.audit.close()
            svc.keys.close()
            log.info("stopped; audit flushed", extra={"event": "stop"})

    app = FastAPI(title="safedl serve", version="1", lifespan=lifespan,
                  description="A verified safedl bundle's defended model behind API keys, rate limits and an audit log.")
    app.state.service = svc

    @app.post("/v1/predict", response_model=PredictResponse, responses=_ERRORS, openapi_extra=_PREDICT_BODY,
              summary="Classify one or more images through the bundle's SecurePipeline")
    async def predict(request: Request) -> Response:
        return await _handle(svc, request, "/v1/predict", _predict)

    @app.get("/v1/model", response_model=ModelInfo, responses=_ERRORS, summary="The bundle manifest and metrics")
    async def model(request: Request) -> Response:
        return await _handle(svc, request, "/v1/model", _model_info)

    @app.get("/v1/monitor/summary", responses={**_ERRORS, 404: {"model": ErrorResponse}}, summary="Security monitor snapshot (scope admin)")
    async def monitor_summary(request: Request) -> Response:
        return await _handle(svc, request, "/v1/monitor/summary", _monitor_summary)

    @app.get("/v1/health", response_model=Health, summary="Liveness")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/ready", response_model=Ready, responses={503: {"model": Ready}}, summary="Readiness")
    async def ready() -> Response:
        problems = svc.problems()
        svc.metrics.ready.set(0 if problems else 1)
        return JSONResponse({"ready": not problems, "bundle_version": svc.bundle.version, "problems": problems},
                            status_code=503 if problems else 200)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(svc.metrics.render(), media_type=CONTENT_TYPE)

    return app
