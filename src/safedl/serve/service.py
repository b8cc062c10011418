"""The service's state and its admission rules: ``Service`` (one per app).

Admission, in the order a request meets it: the key from the headers (401; a client whose failed lookups are
over its budget gets 429 before any lookup, serve/unauth.py) -> scope (403) -> the monitor's key actions (403
blocked) -> the key's request token bucket (429): all before one byte of the body is read. Then, once the body
is in, the pixels the image headers declare against the per-request cap (413) and the key's pixel budget (429),
decoding, and the key's daily image quota (429).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

import torch

from safedl.defenses.ownership.dawn import ResponseWatermark
from safedl.defenses.postprocess.prediction_poisoning import LastLayerMAD, random_surrogate
from safedl.serve.audit import AuditStore
from safedl.serve.batcher import MicroBatcher
from safedl.serve.config import ServeConfig
from safedl.serve.decode import Decoded, InputError, check_request_pixels, declared_pixels, decode_items
from safedl.serve.input_cache import InputCache
from safedl.serve.keys import ApiKey, KeyStore, token_key_id, well_formed
from safedl.serve.limits import RateLimiter, Verdict
from safedl.serve.metrics import Metrics
from safedl.serve.monitor.store import KeyActions, KeyBlocked
from safedl.serve.request import ApiError, RequestContext
from safedl.serve.review.store import ReviewStore
from safedl.serve.rollout.manager import RolloutManager
from safedl.serve.stores.engine import StoreUnavailable
from safedl.serve.swap import BundleSwapper
from safedl.serve.unauth import UnauthenticatedGuard

log = logging.getLogger("safedl.serve")
UNAUTHORIZED = ("missing, unknown or revoked API key (send it as 'Authorization: Bearer <key>' or "
                "'X-API-Key: <key>')")


def _bundle_shape_and_names(bundle: Any) -> tuple[tuple[int, int, int], list[str]]:
    data = (bundle.manifest or {}).get("data", {}) if isinstance(bundle.manifest, dict) else {}
    shape = getattr(bundle.pipeline, "input_shape", None) or data.get("shape")
    if not shape or len(shape) != 3:
        raise ValueError("the bundle does not say its input shape (C, H, W); re-export it")
    names = getattr(bundle.pipeline, "class_names", None) or data.get("class_names")
    names = [str(n) for n in names] if names else [str(i) for i in range(int(data.get("num_classes", 0)))]
    return tuple(int(s) for s in shape), names


def poisoning_for(bundle: Any, config: ServeConfig, shape: tuple[int, int, int], k: int) -> LastLayerMAD | None:
    """LastLayerMAD for the score tiers when ``config.poisoning_epsilon`` > 0 (surrogate normalised like the
    bundle's model), else None."""
    if config.poisoning_epsilon <= 0:
        return None
    spec = (bundle.manifest or {}).get("model", {}) if isinstance(bundle.manifest, dict) else {}
    mean, std = spec.get("mean"), spec.get("std")
    sur = random_surrogate(shape, k, seed=config.poisoning_seed, mean=tuple(mean) if mean else None,
                           std=tuple(std) if std else None)
    return LastLayerMAD(surrogate=sur, epsilon=config.poisoning_epsilon)


class Service:
    """The app's state: bundle, stores (keys, audit, review queue), batcher, limits, metrics, monitor, swapper."""

    def __init__(self, *, bundle: Any, keys: KeyStore, audit: AuditStore, config: ServeConfig,
                 monitor_config: Any = None):
        self.bundle, self.keys, self.audit, self.config = bundle, keys, audit, config
        self.pipeline = bundle.pipeline
        self.shape, self.class_names = _bundle_shape_and_names(bundle)
        self.limiter = RateLimiter(keys)
        self.metrics = Metrics()
        self.batcher = MicroBatcher(self._decide, max_batch=config.max_batch,
                                    max_wait_s=config.max_wait_ms / 1000.0, on_batch=self.metrics.batch_size.observe)
        self.actions = KeyActions(keys)  # automatic responses of the monitor, lifted with `safedl keys restore`
        self.unauth = UnauthenticatedGuard(rate_per_s=config.unauth_rate_per_s, burst=config.unauth_burst,
                                           total_rate_per_s=config.unauth_total_rate_per_s,
                                           total_burst=config.unauth_total_burst)
        self.review = (ReviewStore(config.review_db, max_bytes=config.review_max_bytes, create=True,
                                   retention_days=config.review_retention_days)
                       if config.review_db is not None else None)
        self.watermark = (ResponseWatermark(key=config.watermark_key, num_classes=len(self.class_names),
                                            rate=config.watermark_rate) if config.watermark_key else None)
        self.poisoning = poisoning_for(bundle, config, self.shape, len(self.class_names))
        self.monitor = None
        if monitor_config is not None:
            from safedl.serve.monitor.build import build_monitor

            self.monitor = build_monitor(monitor_config, keys=keys, audit_path=audit.target,
                                         registry=self.metrics.registry, num_classes=len(self.class_names),
                                         bundle_version=lambda: self.bundle.version, bundle=lambda: self.bundle)
            if self.review is not None:
                self.monitor.on_flag = self._queue_flagged
        self.swapper = BundleSwapper(self, start_path=bundle.path,
                                     device=str(getattr(self.pipeline, "device", None) or "cpu"))
        self.rollout = RolloutManager(self)  # canary / shadow releases (serve/rollout)
        self.input_cache = (InputCache(max_bytes_per_key=config.input_cache_bytes_per_key,
                                       max_keys=config.input_cache_keys)
                            if config.input_cache_bytes_per_key > 0 else None)
        self._known_ids: frozenset[str] = frozenset()
        self._keys_error: str | None = None
        self._flusher: threading.Thread | None = None
        self._stop = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.audit.start()
        self.batcher.start()
        if self.monitor is not None:
            self.monitor.start()
        if self.review is not None:
            try:
                self.review.prune()
            except StoreUnavailable as exc:  # queueing retries it; requests never depend on the review queue
                log.warning("review queue: pruning at start failed: %s", exc, extra={"event": "review_unavailable"})
        self.swapper.publish()
        self.refresh_known_keys()
        self._stop.clear()
        self._flusher = threading.Thread(target=self._flush_loop, name="safedl-unauth-flush", daemon=True)
        self._flusher.start()

    def stop(self) -> None:
        """In-flight requests have finished: flush the model queue, the aggregated counts, then the audit."""
        self.rollout.close()
        self.batcher.stop()
        if self.monitor is not None:
            self.monitor.close()
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join(10.0)
        self.flush_unauthenticated()
        self.audit.close()
        self.keys.close()
        if self.review is not None:
            self.review.close()

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.config.unauth_flush_s):
            self.flush_unauthenticated()
            self.refresh_known_keys()

    def flush_unauthenticated(self) -> None:
        rows = self.unauth.drain()
        if rows and self.audit.record_unauthenticated(rows) == 0:
            self.metrics.unauth_dropped.inc(sum(r["count"] for r in rows))

    # -- the model -------------------------------------------------------------------------------------------
    def _decide(self, x: torch.Tensor) -> Any:
        """The pipeline on its own device (decoded images are on the CPU); the answer comes back to the CPU, tagged
        with the bundle version (read under the model lock, which a bundle swap holds: see serve/swap.py)."""
        pipe, version = self.pipeline, self.bundle.version
        dev = getattr(pipe, "device", None)
        if dev is None or torch.device(dev).type == "cpu":
            return dataclasses.replace(pipe.decide(x), bundle_version=version)
        d = pipe.decide(x.to(dev))
        return type(d)(labels=d.labels.cpu(), probs=d.probs.cpu(), rejected=d.rejected.cpu(), reasons=d.reasons,
                       detector_scores={k: v.cpu() for k, v in d.detector_scores.items()}, thresholds=d.thresholds,
                       bundle_version=version, detector_failures=d.detector_failures)

    def _queue_flagged(self, rows: list[dict]) -> None:
        """Inputs the monitor's query detectors flagged, into the review queue (the monitor's thread)."""
        try:
            self.review.keep([{**r, "bundle_version": self.bundle.version, "class_names": self.class_names}
                              for r in rows])
        except StoreUnavailable as exc:
            log.warning("review queue unavailable, %d flagged input(s) not queued: %s", len(rows), exc,
                        extra={"event": "review_unavailable"})

    def problems(self) -> list[str]:
        out = []
        if not self.batcher.running:
            out.append("model worker not running")
        if not self.audit.healthy:
            out.append(f"audit log unavailable: {self.audit.last_error}")
        if self._keys_error is not None:  # as of the last refresh (every unauth_flush_s): not ready, not routed to
            out.append(f"key store unavailable: {self._keys_error}")
        return out

    # -- admission -------------------------------------------------------------------------------------------
    def refuse_unauthenticated(self, *, client: str | None, endpoint: str, code: str = "unauthorized") -> ApiError:
        """Count a failure before authentication; the 401 to answer, or 429 once the client's failure budget is
        spent (then no token tells whether a guess was close: the answer is the same for any wrong key)."""
        refusal = self.unauth.check(client)
        code = "unauth_limited" if refusal is not None else code
        self.unauth.failed(client, endpoint=endpoint, code=code)
        self.metrics.unauthenticated.labels(code).inc()
        if refusal is not None:
            return _unauth_limited(refusal.retry_after_s)
        return ApiError(401, code, UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})

    def refuse_early(self, *, token: str | None, client: str | None, endpoint: str) -> ApiError | None:
        """At the edge, before routing (no thread hop, no database): the refusal of a token that cannot be a key,
        or of a token whose key id no live key had at the last refresh when its client's failure budget is spent;
        None otherwise (the route then looks the key up, so a key created since the refresh still works)."""
        if well_formed(token) and (token_key_id(token) in self._known_ids or self.unauth.check(client) is None):
            return None
        return self.refuse_unauthenticated(client=client, endpoint=endpoint)

    def refresh_known_keys(self) -> None:
        """The ids of the live keys, for ``refuse_early`` (refreshed with the aggregated counts' flush)."""
        try:
            self._known_ids = frozenset(k.key_id for k in self.keys.list() if k.revoked_at is None)
            self._keys_error = None
        except Exception as exc:  # noqa: BLE001 - a store hiccup: keep the previous set; lookups still decide
            if self._keys_error is None:
                log.warning("could not refresh the key ids: %s", exc)
            self._keys_error = f"{type(exc).__name__}: {exc}"

    def admit(self, token: str | None, scope: str, ctx: RequestContext) -> ApiKey:
        """Key lookup, scope, key actions and the request token bucket (a worker thread; raises ApiError: 503
        when the key database cannot answer, fail closed)."""
        try:
            return self._admit(token, scope, ctx)
        except StoreUnavailable as exc:
            raise _store_unavailable(exc) from None

    def _admit(self, token: str | None, scope: str, ctx: RequestContext) -> ApiKey:
        key = self.keys.authenticate(token)
        if key is None:
            raise self.refuse_unauthenticated(client=ctx.client, endpoint=ctx.endpoint)
        ctx.key_id, ctx.tier, ctx.authenticated = key.key_id, key.tier, True
        if scope not in key.scopes and not (scope == "metrics" and "admin" in key.scopes):
            raise ApiError(403, "forbidden", f"this key's scopes ({', '.join(key.scopes)}) do not include {scope!r}")
        try:
            key = self.actions.enforce(key)
        except KeyBlocked as exc:
            raise ApiError(403, "key_blocked", str(exc)) from None
        ctx.tier = key.tier
        self._refuse_if(self.limiter.take(key))
        return key

    def _refuse_if(self, v: Verdict) -> None:
        if v.allowed:
            return
        self.metrics.rate_limited.labels(v.kind).inc()
        what = {"rate": "rate limit", "quota": "daily image quota", "pixels": "pixel budget"}[v.kind]
        raise ApiError(429, f"{v.kind}_limited", f"{what} exceeded for this key; retry after {v.retry_after_s} s",
                       {"Retry-After": str(v.retry_after_s)})

    def decode_and_charge(self, items: list[bytes], key: ApiKey) -> Decoded:
        """Pixels declared by the headers against the key's pixel budget, then decoding, then the image quota."""
        try:
            cfg = self.config
            pixels = sum(declared_pixels(items, shape=self.shape, config=cfg))
            check_request_pixels(pixels, config=cfg)  # before the key's budget: one that can never pass is a 413
            self._refuse_if(self.limiter.charge_pixels(key, pixels=pixels, rate_per_s=cfg.key_pixels_per_s,
                                                       burst=max(cfg.key_pixel_burst, cfg.max_request_pixels)))
            decoded = self._decode(items, key)
            self._refuse_if(self.limiter.charge_images(key, images=decoded.x.shape[0]))
        except InputError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None
        except StoreUnavailable as exc:
            raise _store_unavailable(exc) from None
        return decoded

    def _decode(self, items: list[bytes], key: ApiKey) -> Decoded:
        """Decoding, through the key's input cache when there is one (a hit skips decoding only)."""
        cfg = self.config
        if self.input_cache is None:
            return decode_items(items, shape=self.shape, config=cfg)
        decoded, hits = self.input_cache.decode(key.key_id, items,
                                                lambda some: decode_items(some, shape=self.shape, config=cfg))
        self.metrics.input_cache.labels("hit").inc(hits)
        self.metrics.input_cache.labels("miss").inc(len(items) - hits)
        n = decoded.x.shape[0]
        if n > cfg.max_images:  # the request's total, as decode_items checks it for one call
            raise InputError(413, "too_many_images", f"{n} images in one request; at most {cfg.max_images}")
        return decoded


_last_store_log = [0.0]


def _store_unavailable(exc: StoreUnavailable) -> ApiError:
    now = time.monotonic()
    if now - _last_store_log[0] >= 5.0:  # one line per 5 s during an outage, not one per request
        _last_store_log[0] = now
        log.error("key database unavailable, answering 503: %s", exc, extra={"event": "store_unavailable"})
    return ApiError(503, "store_unavailable", "the key and limit store is unavailable; retry later",
                    {"Retry-After": "5"})


def _unauth_limited(retry_after_s: int) -> ApiError:
    return ApiError(429, "unauth_limited", f"too many requests without a valid key from this address; retry after "
                                           f"{retry_after_s} s", {"Retry-After": str(retry_after_s)})
