"""Assemble a ``SecurityMonitor`` from a validated config: detectors with their calibrated thresholds, the alert
table in the audit database, the key-action table in the key database, the stateful detector's shared per-key
history (stores/history.py: next to a SQLite audit file, or in the PostgreSQL audit database; unless
``detectors.stateful.history_store: memory``), the sinks and the metrics."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from prometheus_client import CollectorRegistry

from safedl.errors import UserError
from safedl.serve.keys import KeyStore
from safedl.serve.monitor.calibration import load_calibration
from safedl.serve.monitor.config import MonitorConfig
from safedl.serve.monitor.core import SecurityMonitor
from safedl.serve.monitor.drift import DriftMetrics, DriftMonitor
from safedl.serve.monitor.metrics import MonitorMetrics
from safedl.serve.monitor.sinks import Notifier
from safedl.serve.monitor.store import AlertStore, KeyActions
from safedl.serve.stores.history import DatabaseHistory, history_location

log = logging.getLogger("safedl.serve.monitor")


def _threshold(name: str, override: float | None, calib: dict | None, field: str, params: dict[str, int]) -> float:
    if override is not None:
        return float(override)
    if calib is None:
        raise UserError(f"monitor config: detectors.{name}.{field} is not set and there is no calibration file; run "
                        f"`safedl monitor calibrate BUNDLE --out calibration.json` and set `calibration:` (or give "
                        f"detectors.{name}.{field})")
    rec = calib[name]
    for p, v in params.items():
        if int(rec[p]) != int(v):
            raise UserError(f"monitor config: detectors.{name}.{p} = {v}, but the calibration file measured its "
                            f"threshold with {p} = {rec[p]}; recalibrate with `safedl monitor calibrate --{p} {v}` "
                            f"or set detectors.{name}.{p}: {rec[p]}")
    return float(rec[field])


def build_detectors(config: MonitorConfig, *, num_classes: int, bundle_version: str | None = None,
                    shared: Any = None) -> dict[str, Any]:
    """The enabled detectors; ``shared``: the SharedHistory of the stateful detector and of PRADA where their
    ``history_store`` is ``database`` (None: in memory)."""
    from safedl.defenses.query import PRADA, StatefulDetector, VolumeAnomaly

    d = config.detectors
    calib = load_calibration(config.calibration) if config.calibration is not None else None
    if calib is not None and bundle_version is not None and calib.get("bundle_version") != bundle_version:
        log.warning("the calibration %s was measured for bundle %s, not %s; recalibrate after a model change",
                    config.calibration, calib.get("bundle_version"), bundle_version,
                    extra={"event": "calibration_mismatch"})
    out: dict[str, Any] = {}
    if d.stateful.enabled:
        thr = _threshold("stateful", d.stateful.threshold, calib, "threshold",
                         {"k": d.stateful.k, "history": d.stateful.history})
        out["stateful"] = StatefulDetector(k=d.stateful.k, history=d.stateful.history, threshold=thr,
                                           max_keys=config.max_keys, name="stateful",
                                           shared=shared if d.stateful.history_store == "database" else None)
    if d.prada.enabled:
        delta = _threshold("prada", d.prada.delta, calib, "delta",
                           {"min_queries": d.prada.min_queries, "window": d.prada.window})
        out["prada"] = PRADA(delta=delta, min_queries=d.prada.min_queries, window=d.prada.window,
                             max_growing=d.prada.max_growing, num_classes=max(1, num_classes),
                             max_keys=config.max_keys, name="prada",  # classes: the labels the service answered
                             shared=shared if d.prada.history_store == "database" else None)
    out.update(_ood_detectors(config, calib))
    if d.volume.enabled:
        out["volume"] = VolumeAnomaly(bucket_s=d.volume.bucket_s, baseline_buckets=d.volume.baseline_buckets,
                                      sigma=d.volume.sigma, warmup_buckets=d.volume.warmup_buckets,
                                      prior_rate=d.volume.prior_rate, max_keys=config.max_keys)
    return out


def _ood_detectors(config: MonitorConfig, calib: dict | None) -> dict[str, Any]:
    """The copycat and Sybil detectors, sharing the pixel subspace the calibration file measured."""
    from safedl.defenses.query import CopycatDetector, PixelSubspace, SybilDetector

    c, s = config.detectors.copycat, config.detectors.sybil
    if not (c.enabled or s.enabled):
        return {}
    rec = None if calib is None else calib.get("copycat")
    if rec is None:
        raise UserError("monitor config: detectors.copycat / detectors.sybil need the pixel subspace of a calibration "
                        "file made by this version; run `safedl monitor calibrate BUNDLE --out calibration.json` and "
                        "set `calibration:` (or set detectors.copycat.enabled and detectors.sybil.enabled to false)")
    sub, q = PixelSubspace.from_record(rec), float(rec["quantile"])
    out: dict[str, Any] = {}
    if c.enabled:
        out["copycat"] = CopycatDetector(subspace=sub, quantile=q, null_rate=c.null_rate, alpha=c.alpha,
                                         min_queries=c.min_queries, window=c.window, max_keys=config.max_keys)
    if s.enabled:
        out["sybil"] = SybilDetector(subspace=sub, quantile=q, null_rate=s.null_rate, alpha=s.alpha,
                                     key_alpha=s.key_alpha, min_queries=s.min_queries, window=s.window,
                                     global_window=s.global_window, max_keys=config.max_keys)
    return out


def build_monitor(config: MonitorConfig, *, keys: KeyStore, audit_path: Any, registry: CollectorRegistry,
                  num_classes: int, bundle_version: Callable[[], str],
                  bundle: Callable[[], Any] | None = None) -> SecurityMonitor:
    shared = None
    d = config.detectors
    if any(c.enabled and c.history_store == "database" for c in (d.stateful, d.prada)):
        shared = DatabaseHistory(history_location(audit_path))
    detectors = build_detectors(config, num_classes=num_classes, bundle_version=bundle_version(), shared=shared)
    calib = load_calibration(config.calibration) if config.calibration is not None else None
    mis = (calib or {}).get("misinformation") if config.misinformation else None
    metrics = MonitorMetrics(registry)
    drift = DriftMonitor(config.drift, metrics=DriftMetrics(registry)) if config.drift.enabled and bundle else None
    log.info("monitor: detectors %s, %d rules", {n: getattr(d, "threshold_", None) or getattr(d, "delta_", None)
                                                 for n, d in detectors.items()}, len(config.rules),
             extra={"event": "monitor_start"})
    return SecurityMonitor(config=config, detectors=detectors, alerts=AlertStore(audit_path), actions=KeyActions(keys),
                           metrics=metrics, notifier=Notifier(config.sinks, count=metrics.count_notification),
                           bundle_version=bundle_version, drift=drift, bundle=bundle, history=shared,
                           misinformation_tau=None if mis is None else float(mis["tau"]))
