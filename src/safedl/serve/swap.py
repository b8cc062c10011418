"""Bundle hot swap and rollback without downtime: ``POST /v1/admin/bundle``, ``POST /v1/admin/rollback`` (scope
``admin``) and SIGHUP (reload the bundle path given at start).

A new bundle is verified exactly as at start (every file's sha256, the HMAC signature with the same
``--signing-key-file``; every file read once and the system built from those verified bytes), rebuilt and run
once on a blank image in a worker thread, off the request path; one with another input shape or class count is
refused with nothing changed, and so is, over HTTP without a signing key, one whose model is built by a Python
entry point (the manifest would name the function the server calls). The swap itself replaces the service's
pipeline, bundle and class names while holding the model lock (``MicroBatcher.exclusive``), so a forward pass runs
wholly on the old pipeline or wholly on the new one and every answer names the version that decided it. Every
attempt, refused or not, is a row in the ``bundle_swaps`` table of the audit database and a count in
``safedl_bundle_swaps_total{outcome}``; a swap whose row cannot be written does not happen (503), the way a request
is not answered without its audit row.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import torch
from prometheus_client import Counter

from safedl.deploy import load_bundle
from safedl.errors import UserError
from safedl.serve.stores import engine as engines
from safedl.serve.stores.migrate import ensure_schema
from safedl.serve.stores.schema import SWAP_COLUMNS, bundle_swaps
from safedl.serve.slis import BundleSLICollector, bundle_slis

log = logging.getLogger("safedl.serve.swap")
OUTCOMES = ("swapped", "rolled_back", "refused", "failed")
_COLS = SWAP_COLUMNS


class SwapRefused(Exception):
    """The swap did not happen; ``status``/``code``/``message`` become the HTTP error."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def record_swap(audit: Any, row: dict[str, Any]) -> None:
    """Commit one ``bundle_swaps`` row to the audit database: ``audit`` is the audit store's Engine, or a
    PATH_OR_URL opened for this one row (raises StoreUnavailable / UserError on failure)."""
    engine = audit if isinstance(audit, sa.Engine) else engines.open_engine(audit, flag="--audit", pool_size=1,
                                                                            max_overflow=0)
    try:
        if engine is not audit:
            ensure_schema(engine, what="audit database")
        with engines.write(engine, what="bundle swap audit") as conn:
            conn.execute(bundle_swaps.insert().values(**{c: row.get(c) for c in _COLS}))
    finally:
        if engine is not audit:
            engine.dispose()


def _event(action: str, outcome: str, ctx: dict, path: Any, **more: Any) -> dict:
    """The structured fields of a swap's log line."""
    return {"event": "bundle_swap", "outcome": outcome, "action": action, "trigger": ctx.get("trigger", "http"),
            "path": None if path is None else str(path), **more}


def _class_count(bundle: Any) -> int:
    data = bundle.manifest.get("data", {}) if isinstance(bundle.manifest, dict) else {}
    names = getattr(bundle.pipeline, "class_names", None) or data.get("class_names")
    return len(names) if names else int(data.get("num_classes", 0))


class BundleSwapper:
    """Swaps the bundle of a ``Service`` (``svc``) and keeps the one before it for ``rollback``."""

    def __init__(self, svc: Any, *, start_path: Path, signing_key: bytes | None = None, device: str = "cpu"):
        self.svc, self.start_path, self.signing_key, self.device = svc, Path(start_path), signing_key, device
        self.previous: Any = None
        self.workers = 1
        self._lock = threading.Lock()  # one swap at a time; a second one is refused (409), not queued
        self.slis = BundleSLICollector()
        self.swaps = Counter("safedl_bundle_swaps", "bundle swap attempts by outcome", ["outcome"],
                             registry=svc.metrics.registry)
        for outcome in OUTCOMES:
            self.swaps.labels(outcome)
        svc.metrics.register_collector(self.slis)

    def configure(self, *, start_path: Path, signing_key: bytes | None, device: str, workers: int = 1) -> None:
        """How ``safedl serve`` was started: SIGHUP reloads ``start_path``; every swap needs ``signing_key``'s
        signature (when given) and loads onto ``device``; with ``workers`` > 1 only SIGHUP swaps (every worker
        gets it from the supervisor; a swap over HTTP would change the answering worker only)."""
        self.start_path, self.signing_key, self.device = Path(start_path), signing_key, str(device)
        self.workers = int(workers)

    def publish(self) -> None:
        """Export the SLIs of the bundle being served (at start; a swap does it itself)."""
        b = self.svc.bundle
        self.slis.publish(bundle_slis(manifest=b.manifest if isinstance(b.manifest, dict) else {}, version=b.version))

    # -- checks (off the request path) -------------------------------------------------------------------------
    def _load(self, path: Path, *, operator_path: bool) -> Any:
        try:  # a path from an admin request may build its model by a Python entry point only when signed
            new = load_bundle(path, device=self.device, signing_key=self.signing_key,
                              allow_entry_point=operator_path or self.signing_key is not None)
        except UserError as exc:
            raise SwapRefused(422, "bundle_refused", f"bundle {path} refused: {exc}") from None
        svc = self.svc
        shape = tuple(int(s) for s in (getattr(new.pipeline, "input_shape", None) or ()))
        if shape != svc.shape:
            raise SwapRefused(422, "bundle_incompatible", f"bundle {path} takes input shape {list(shape)}; the "
                                                          f"service serves {list(svc.shape)} (start a new server)")
        n = _class_count(new)
        if n != len(svc.class_names):
            raise SwapRefused(422, "bundle_incompatible", f"bundle {path} has {n} classes; the service serves "
                                                          f"{len(svc.class_names)} (start a new server)")
        try:
            with torch.inference_mode():
                d = new.pipeline.decide(torch.zeros(1, *shape, device=torch.device(self.device)))
        except Exception as exc:  # a model that cannot run must not go live
            raise SwapRefused(422, "bundle_refused", f"bundle {path}: its pipeline fails on a blank "
                                                     f"{list(shape)} image ({type(exc).__name__}: {exc})") from None
        if d.probs.shape[1] != n:
            raise SwapRefused(422, "bundle_incompatible", f"bundle {path}: the model answers {d.probs.shape[1]} "
                                                          f"scores for {n} class names")
        return new

    # -- the swap ----------------------------------------------------------------------------------------------
    def _install(self, new: Any) -> Any:
        svc, slis = self.svc, bundle_slis(manifest=new.manifest, version=new.version)
        data = new.manifest.get("data", {})
        names = getattr(new.pipeline, "class_names", None) or data.get("class_names") or svc.class_names
        with svc.batcher.exclusive():  # no forward pass runs while the three change together
            old = svc.bundle
            svc.pipeline, svc.bundle, svc.class_names = new.pipeline, new, [str(c) for c in names]
        self.slis.publish(slis)
        return old

    def _audit(self, outcome: str, action: str, ctx: dict, *, to: str | None, path: Any, detail: str | None) -> None:
        row = {"ts": time.time(), "request_id": ctx.get("request_id"), "key_id": ctx.get("key_id"),
               "trigger": ctx.get("trigger", "http"), "action": action, "outcome": outcome,
               "from_version": self.svc.bundle.version, "to_version": to,
               "path": None if path is None else str(path), "detail": detail}
        audit = self.svc.audit
        record_swap(audit.engine if audit.engine is not None else audit.target, row)

    def _refused(self, exc: SwapRefused, action: str, ctx: dict, path: Any) -> SwapRefused:
        outcome = "failed" if exc.status >= 500 else "refused"
        self.swaps.labels(outcome).inc()
        log.warning("bundle %s %s: %s", action, outcome, exc.message,
                    extra=_event(action, outcome, ctx, path, bundle_version=self.svc.bundle.version))
        try:
            self._audit(outcome, action, ctx, to=None, path=path, detail=f"{exc.code}: {exc.message}")
        except Exception as audit_exc:  # the refusal stands either way
            log.error("bundle %s refusal not audited: %s", action, audit_exc)
        return exc

    def _commit(self, new: Any, action: str, ctx: dict, path: Any) -> dict:
        outcome = "rolled_back" if action == "rollback" else "swapped"
        try:
            self._audit(outcome, action, ctx, to=new.version, path=path, detail=None)
        except Exception as exc:  # StoreUnavailable, OSError: no unaudited swap
            raise SwapRefused(503, "audit_unavailable", f"the swap could not be audited ({exc}); nothing changed")
        old = self._install(new)
        self.previous = old
        self.swaps.labels(outcome).inc()
        log.info("bundle %s: %s -> %s", action, old.version, new.version,
                 extra=_event(action, outcome, ctx, path, from_version=old.version, bundle_version=new.version))
        return {"bundle_version": new.version, "previous_version": old.version, "path": str(new.path),
                "outcome": outcome}

    def _locked(self, action: str, ctx: dict, path: Any, work) -> dict:
        if self.workers > 1 and ctx.get("trigger", "http") == "http":
            raise self._refused(SwapRefused(409, "swap_needs_sighup", f"this server runs {self.workers} workers: a "
                                            "swap over HTTP would change only the one that answers; put the bundle "
                                            "at the start path and send SIGHUP to `safedl serve` (every worker "
                                            "reloads it)"), action, ctx, path)
        if not self._lock.acquire(blocking=False):
            raise self._refused(SwapRefused(409, "swap_in_progress", "another bundle swap is in progress; retry "
                                                                     "when it has finished"), action, ctx, path)
        try:
            return self._commit(work(), action, ctx, path)
        except SwapRefused as exc:
            raise self._refused(exc, action, ctx, path) from None
        except Exception as exc:  # a bug or an unreadable file: counted and audited as failed, then raised (500)
            self._refused(SwapRefused(500, "internal", f"{type(exc).__name__}: {exc}"), action, ctx, path)
            raise
        finally:
            self._lock.release()

    def swap_to(self, path: str | Path, *, ctx: dict, operator_path: bool = False) -> dict:
        """Verify, load and check the bundle at ``path``, then swap to it (raises SwapRefused, nothing changed).

        ``operator_path``: the path the operator started the server with (SIGHUP), trusted as at start."""
        return self._locked("swap", ctx, Path(path), lambda: self._load(Path(path), operator_path=operator_path))

    def check_bundle(self, path: str | Path, *, operator_path: bool = False) -> Any:
        """Verify, load and check the bundle at ``path`` as a swap would, without swapping (a canary or shadow:
        serve/rollout); raises SwapRefused."""
        return self._load(Path(path), operator_path=operator_path)

    def promote(self, new: Any, *, ctx: dict) -> dict:
        """Swap to ``new``, a bundle loaded and checked already (a canary that passed its rollout); audited and
        counted like every swap (raises SwapRefused, nothing changed)."""
        return self._locked("swap", ctx, new.path, lambda: new)

    def rollback(self, *, ctx: dict) -> dict:
        """Swap back to the bundle served before the last swap (the current one becomes the previous one)."""
        def previous() -> Any:
            if self.previous is None:
                raise SwapRefused(409, "no_previous_bundle", "no bundle to roll back to: none was swapped out "
                                                             "since the server started")
            return self.previous
        return self._locked("rollback", ctx, None, previous)

    def reload(self) -> dict | None:
        """SIGHUP: swap to the bundle at the path given at start (logged and counted; never raises)."""
        try:
            return self.swap_to(self.start_path, ctx={"trigger": "sighup"}, operator_path=True)
        except SwapRefused:
            return None  # logged, counted and audited by _refused


def install_sighup(swapper: BundleSwapper) -> None:
    """SIGHUP reloads the bundle at the start path, in a thread (the signal handler only starts it)."""
    def on_hup(signum, frame) -> None:
        threading.Thread(target=swapper.reload, name="safedl-sighup-reload", daemon=True).start()

    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_hup)
