"""Drift of the served traffic against the bundle's drift reference (``safedl export`` stores it: penultimate
features and labels of the run's validation split; safedl.deploy.drift_reference).

Per scope (all traffic, and each key when ``drift.per_key``), images are collected into tumbling windows of
``drift.window`` images (every answered image counts, rejected ones included). When a window is full it is tested:

- ``input``: the MMD permutation test (Gretton et al. 2012) of the window's penultimate features against the
  reference's, p = (k + 1) / (B + 1);
- ``prediction``: Pearson's chi-square homogeneity test of the window's predicted labels against the reference's.

Features and labels come from a private copy of the bundle's bare model (one forward pass per image in the
monitor's worker thread, off the request path), the same representation the reference holds. The p-values of
each scope's latest tests are what the rules ``input_drift_p`` / ``prediction_drift_p`` compare. The tests assume
the window's images are independent draws: a client that sends one image many times, or correlated bursts, is
drift by this definition (and per-key windows test one client's traffic, whose class mix may legitimately differ
from the reference's). A swapped bundle brings its own reference and restarts every window.
"""
from __future__ import annotations

import copy
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from safedl.models.features import feature_module
from safedl.serve.monitor.config import Drift
from safedl.serve.monitor.two_sample import MMDPermutationTest, TestResult, chi2_homogeneity

log = logging.getLogger("safedl.serve.monitor.drift")
TESTS = ("input", "prediction")


class DriftMetrics:
    """``safedl_drift_*``: the global scope's latest p-values and statistics, tests by scope and outcome."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.p_value = Gauge("safedl_drift_p_value", "p-value of the latest global drift test (workers: the minimum)",
                             ["test"], multiprocess_mode="livemin", registry=r)
        self.statistic = Gauge("safedl_drift_statistic", "statistic of the latest global drift test (MMD^2, "
                               "chi-square)", ["test"], multiprocess_mode="livemax", registry=r)
        self.windows = Counter("safedl_drift_windows", "drift test windows by test, scope (global, key) and outcome "
                               "(drift: p <= 0.005, the default rules' threshold; else ok)", ["test", "scope", "outcome"],
                               registry=r)
        self.seconds = Histogram("safedl_drift_test_seconds", "time of one window's two drift tests",
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0), registry=r)
        self.reference = Gauge("safedl_drift_reference_images", "images in the served bundle's drift reference "
                               "(0: the bundle has none, drift is not tested)", multiprocess_mode="livemin",
                               registry=r)


@dataclass
class _Window:
    feats: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    size: int = 0
    latest: dict[str, TestResult] = field(default_factory=dict)


class _Reference:
    """What one bundle's reference gives the tests: the model copy, the MMD test, the label counts."""

    def __init__(self, bundle: Any, *, permutations: int):
        ref = bundle.drift
        self.version = bundle.version
        self.model = copy.deepcopy(bundle.pipeline.model).cpu().eval()
        self.module, self.read_input = feature_module(self.model)
        self.mmd = MMDPermutationTest(ref.features, permutations=permutations)
        self.pred_counts = torch.bincount(ref.pred_labels, minlength=ref.num_classes)
        self.num_classes, self.n = ref.num_classes, len(ref.features)

    @torch.no_grad()
    def features_and_labels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        got: list[torch.Tensor] = []

        def hook(_m: Any, inp: tuple, out: Any) -> None:
            got.append((inp[0] if self.read_input else out).flatten(1))

        h = self.module.register_forward_hook(hook)
        try:
            logits = self.model(x.cpu())
        finally:
            h.remove()
        return got[-1].float(), logits.argmax(1)


class DriftMonitor:
    """Tumbling windows per scope and their tests; ``observe`` is called by the monitor's worker thread only."""

    ALPHA_REPORT = 0.005  # what the windows counter calls "drift" (the default rules' threshold)

    def __init__(self, config: Drift, *, metrics: DriftMetrics | None = None):
        self.config, self.metrics = config, metrics
        self._ref: _Reference | None = None
        self._version: str | None = None
        self._global = _Window()
        self._keys: OrderedDict[str, _Window] = OrderedDict()
        self._gen = torch.Generator().manual_seed(config.seed)

    def _reference(self, bundle: Any) -> _Reference | None:
        if bundle is None or bundle.version == self._version:
            return self._ref
        self._version, self._global, self._keys = bundle.version, _Window(), OrderedDict()
        self._ref = _Reference(bundle, permutations=self.config.permutations) \
            if getattr(bundle, "drift", None) is not None else None
        if self._ref is None:
            log.warning("bundle %s has no drift reference (exported with --no-drift-reference or before drift "
                        "references existed): drift is not tested", bundle.version, extra={"event": "drift_off"})
        if self.metrics is not None:
            self.metrics.reference.set(self._ref.n if self._ref is not None else 0)
        return self._ref

    def observe(self, key_id: str, x: torch.Tensor, *, bundle: Any) -> list[tuple[str | None, str, TestResult]]:
        """Add one answered batch; returns (key id or None for global, test, result) of every window it filled."""
        ref = self._reference(bundle)
        if ref is None or len(x) == 0:
            return []
        feats, labels = ref.features_and_labels(x)
        out = self._add(None, self._global, ref, feats, labels)
        if self.config.per_key:
            win = self._keys.get(key_id)
            if win is None:
                win = self._keys[key_id] = _Window()
                while len(self._keys) > self.config.max_keys:
                    self._keys.popitem(last=False)
            else:
                self._keys.move_to_end(key_id)
            out += self._add(key_id, win, ref, feats, labels)
        return out

    def _add(self, key_id: str | None, win: _Window, ref: _Reference, feats: torch.Tensor,
             labels: torch.Tensor) -> list[tuple[str | None, str, TestResult]]:
        out, size, start = [], self.config.window, 0
        while start < len(feats):
            take = min(size - win.size, len(feats) - start)
            win.feats.append(feats[start:start + take])
            win.labels.append(labels[start:start + take])
            win.size += take
            start += take
            if win.size == size:
                f, y = torch.cat(win.feats), torch.cat(win.labels)
                win.feats, win.labels, win.size = [], [], 0
                out += [(key_id, t, r) for t, r in self._test(key_id, win, ref, f, y).items()]
        return out

    def _test(self, key_id: str | None, win: _Window, ref: _Reference, feats: torch.Tensor,
              labels: torch.Tensor) -> dict[str, TestResult]:
        t0 = time.perf_counter()
        res = {"input": ref.mmd(feats, generator=self._gen),
               "prediction": chi2_homogeneity(ref.pred_counts, torch.bincount(labels, minlength=ref.num_classes))}
        win.latest = res
        if self.metrics is not None:
            self.metrics.seconds.observe(time.perf_counter() - t0)
            scope = "global" if key_id is None else "key"
            for test, r in res.items():
                self.metrics.windows.labels(test, scope, "drift" if r.p_value <= self.ALPHA_REPORT else "ok").inc()
                if key_id is None:
                    self.metrics.p_value.labels(test).set(r.p_value)
                    self.metrics.statistic.labels(test).set(r.statistic)
        if key_id is None or any(r.p_value <= self.ALPHA_REPORT for r in res.values()):
            log.info("drift test (%s): input p=%.4g, prediction p=%.4g", key_id or "global", res["input"].p_value,
                     res["prediction"].p_value, extra={"event": "drift_test", "key_id": key_id,
                                                       "input_p": res["input"].p_value,
                                                       "prediction_p": res["prediction"].p_value})
        return res

    def latest_p(self, test: str, key_id: str | None) -> float | None:
        """The p-value of the scope's latest ``test`` (None before its first full window)."""
        win = self._global if key_id is None else self._keys.get(key_id)
        r = win.latest.get(test) if win is not None else None
        return None if r is None else r.p_value

    def snapshot(self) -> dict[str, Any]:
        """The summary's ``drift`` section: the reference, the window size and the global scope's latest tests."""
        latest = {t: {"statistic": r.statistic, "p_value": r.p_value, "n": r.n} for t, r in self._global.latest.items()}
        return {"enabled": self._ref is not None, "reference_images": self._ref.n if self._ref else 0,
                "window": self.config.window, "filled": self._global.size, "latest": latest,
                "keys_tracked": len(self._keys)}
