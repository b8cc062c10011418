"""``POST /v1/predict``: the body (after the key was admitted) -> images -> micro-batched SecurePipeline -> the
key's output tier -> audit fields.

The key is authenticated by the route's ``Security`` dependency before this code reads the body. When the model and
the audit writer are idle, decoding, the forward pass, the answer and its audit commit run in the one worker
thread that decodes (one hand-off); otherwise the request joins the next micro-batch.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from anyio import to_thread
from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from safedl.defenses.ownership.dawn import ResponseWatermark
from safedl.defenses.postprocess.adaptive_misinformation import DEFAULT_NU as MISINFORMATION_NU, misinformed
from safedl.deploy.detector_guard import DetectorUnavailable
from safedl.serve.audit import AuditUnavailable
from safedl.serve.batcher import MicroBatcher
from safedl.serve.decode import Decoded, InputError, items_from_json, raw_content_type_ok
from safedl.serve.http import audit_rows, finite, read_body
from safedl.serve.keys import ApiKey
from safedl.serve.request import ApiError, RequestContext
from safedl.serve.rollout.routing import Route
from safedl.serve.service import Service
from safedl.serve.stores.engine import StoreUnavailable
from safedl.serve.tiers import harden

log = logging.getLogger("safedl.serve")
OPENAPI_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "contentEncoding": "base64"}}}}},
    **{t: {"schema": {"type": "string", "format": "binary"}}
       for t in ("image/png", "image/jpeg", "image/bmp", "image/webp", "application/x-npy")}}}}


async def _form_items(body: bytes, request: Request, svc: Service) -> list[bytes]:
    """The file parts of a multipart body already read (parsed from those bytes, never read again)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    cfg = svc.config
    try:
        form = await Request(request.scope, replay).form(max_files=cfg.max_images, max_fields=cfg.max_images,
                                                         max_part_size=cfg.max_body_bytes)
    except HTTPException as exc:
        too_many = "Too many" in str(exc.detail)
        raise ApiError(413 if too_many else 400, "too_many_images" if too_many else "bad_multipart",
                       f"multipart body: {exc.detail}") from None
    try:
        return [await v.read() for _, v in form.multi_items() if isinstance(v, UploadFile)]
    finally:
        await form.close()


async def request_items(request: Request, svc: Service) -> list[bytes]:
    """The encoded images of a request, by content type (415 for any other)."""
    body = await read_body(request, limit=svc.config.max_body_bytes, config=svc.config)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _form_items(body, request, svc)
    if ctype == "application/json":
        try:
            return items_from_json(body, config=svc.config)
        except InputError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None
    if raw_content_type_ok(ctype):
        return [body] if body else []
    raise ApiError(415, "unsupported_media_type", f"Content-Type {ctype or '(none)'!r}; send multipart/form-data, "
                                                  "application/json, image/png|jpeg|bmp|webp or application/x-npy")


def watermarked(wm: ResponseWatermark, probs, x, served: list[int]) -> tuple[Any, list[int]]:
    """(``probs`` with the keyed watermark applied, the served labels with the watermarked ones replaced)."""
    marked = wm.apply(probs, x)
    changed = (marked != probs).any(1).tolist()
    if not any(changed):
        return probs, served
    top = marked.argmax(1).tolist()
    return marked, [top[i] if c else s for i, (c, s) in enumerate(zip(changed, served))]


def _results(svc: Service, d: dict, decoded: Decoded, tier: str) -> tuple[list[dict], list[dict]]:
    """(response entries, audit fields) per image, from one request's slice of the Decision."""
    labels, rejected = d["labels"].tolist(), d["rejected"].tolist()
    conf = d["probs"].max(1).values.tolist()
    scores = {k: v.tolist() for k, v in d["detector_scores"].items()}
    probs, served = d["probs"], labels
    tau = None if svc.monitor is None else svc.monitor.misinformation_tau
    if tau is not None and tier != "label":  # adaptive misinformation: score keys only; the label is the scores'
        probs = misinformed(probs, tau=tau, nu=MISINFORMATION_NU)
        served = probs.argmax(1).tolist()
    if svc.poisoning is not None and tier != "label":  # LastLayerMAD: score keys only; the label is kept
        probs = svc.poisoning(decoded.x, probs)
    if svc.watermark is not None:  # DAWN: every tier; the served label of a watermarked answer is the watermark's
        probs, served = watermarked(svc.watermark, probs, decoded.x, served)
    shown = harden(probs, tier=tier, decimals=svc.config.round_decimals, k=svc.config.top_k)
    names = svc.class_names
    failed = sorted(d.get("detector_failures") or {})  # fail_open: answered without them, audited as an error
    error = f"detector_failed:{','.join(failed)}" if failed else None
    out, audit = [], []
    for i, lab in enumerate(labels):
        img_scores = {k: float(v[i]) for k, v in scores.items()}
        r = {"index": i, "label": None if rejected[i] else served[i],
             "class_name": None if rejected[i] else names[served[i]],
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
                      "reason": d["reasons"][i], "detector_scores": img_scores, "error": error})
    return out, audit


def _queue_for_review(svc: Service, decoded: Decoded, ctx: RequestContext, version: str | None) -> None:
    """The rejected images of an answered request into the review queue (after the answer; a store failure is
    logged, never turned into an error the client sees)."""
    rows = [{**a, "request_id": ctx.request_id, "key_id": ctx.key_id, "client": ctx.client, "ts": ctx.ts,
             "bundle_version": version, "class_names": svc.class_names, "source": "rejected",
             "image": decoded.x[i].numpy()} for i, a in enumerate(ctx.audit_fields) if a["rejected"]]
    try:
        svc.review.keep(rows)
    except StoreUnavailable as exc:
        log.warning("review queue unavailable, %d rejected input(s) of request %s not queued: %s", len(rows),
                    ctx.request_id, exc, extra={"event": "review_unavailable"})


def _answer(svc: Service, ctx: RequestContext, key: ApiKey, decoded: Decoded, d: dict, *, in_thread: bool) -> dict:
    """The 200 body of a request from its Decision slice; fills the context's audit fields."""
    results, ctx.audit_fields = _results(svc, d, decoded, key.tier)
    svc.metrics.observe_decision(d, tier=key.tier)
    if d.get("detector_failures"):
        log.warning("request %s answered without failed detectors (fail_open): %s", ctx.request_id,
                    d["detector_failures"], extra={"event": "detector_failed", "request_id": ctx.request_id,
                                                   "policy": "fail_open", "failures": d["detector_failures"]})
    ctx.input_sha256 = decoded.sha256
    if svc.monitor is not None:
        svc.monitor.observe(key, decoded.x, d, request_id=ctx.request_id, ts=ctx.ts, input_sha256=decoded.sha256)
    ctx.bundle_version = d.get("bundle_version") or svc.bundle.version  # the bundle that decided
    svc.rollout.observe(decoded.x, d)  # per-version SLIs; a shadow compares this answer off the request path
    if svc.review is not None and any(a["rejected"] for a in ctx.audit_fields):
        if in_thread:
            _queue_for_review(svc, decoded, ctx, ctx.bundle_version)
        else:
            asyncio.get_running_loop().run_in_executor(None, _queue_for_review, svc, decoded, ctx,
                                                       ctx.bundle_version)
    return {"request_id": ctx.request_id, "bundle_version": ctx.bundle_version, "tier": key.tier,
            "results": finite(results)}


def _work_in_thread(svc: Service, key: ApiKey, items: list[bytes], ctx: RequestContext, batcher: MicroBatcher
                    ) -> tuple[Decoded, dict | None]:
    """Decoding and, when the model and the audit writer are idle, the forward pass, the answer and its audit
    commit too. Returns (decoded, body or None)."""
    ctx.mark("read")
    decoded = svc.decode_and_charge(items, key)
    ctx.mark("decode")
    d = batcher.try_inline(decoded.x)
    if d is None:
        return decoded, None
    ctx.mark("model")
    body = _answer(svc, ctx, key, decoded, d, in_thread=True)
    try:
        ctx.audited = svc.audit.try_commit_inline(audit_rows(ctx, status=200, error=None,
                                                             bundle_version=ctx.bundle_version))
    except AuditUnavailable as exc:
        ctx.audit_error = exc
    return decoded, body


async def predict(svc: Service, request: Request, key: ApiKey, ctx: RequestContext) -> dict[str, Any]:
    """The 200 body of an admitted predict request (raises ApiError for refusals), answered by the stable
    version or, for a key in a canary's share, by the canary (serve/rollout); counted per version."""
    route, t0 = svc.rollout.route(key.key_id), time.perf_counter()
    try:
        body = await _predict(svc, request, key, ctx, route)
    except ApiError as exc:
        svc.rollout.record(route.version, status=exc.status, latency_s=time.perf_counter() - t0, role=route.role)
        raise
    except Exception:
        svc.rollout.record(route.version, status=500, latency_s=time.perf_counter() - t0, role=route.role)
        raise
    finally:
        route.done()
    role = route.role if body["bundle_version"] == route.version else None
    svc.rollout.record(body["bundle_version"], status=200, latency_s=time.perf_counter() - t0, role=role)
    return body


async def _predict(svc: Service, request: Request, key: ApiKey, ctx: RequestContext, route: Route
                   ) -> dict[str, Any]:
    batcher = route.batcher
    ctx.mark("admit")
    batcher.expect()
    submitted = False
    try:
        items = await request_items(request, svc)
        decoded, body = await to_thread.run_sync(_work_in_thread, svc, key, items, ctx, batcher)
        submitted = True
        if body is not None:
            return body
        d = await asyncio.wrap_future(route.submit(decoded.x))  # re-routed to stable if the lane stopped
        ctx.mark("model")
    except DetectorUnavailable as exc:  # fail_closed: no answer without the detector
        svc.metrics.detector_failures.labels(exc.detector, "fail_closed").inc()
        log.error("request %s refused: %s", ctx.request_id, exc,
                  extra={"event": "detector_failed", "request_id": ctx.request_id, "policy": "fail_closed"})
        raise ApiError(503, "detector_unavailable", f"detector {exc.detector!r} is unavailable; the request was "
                                                    "not answered", {"Retry-After": "5"}) from None
    finally:
        if not submitted:
            batcher.cancel()
    return _answer(svc, ctx, key, decoded, d, in_thread=False)
