"""Per-version SLIs of a canary or shadow release (label ``version_role``: stable, canary or shadow, and
``bundle_version``) and the rollout controller's decisions, on the app's registry (served at ``/metrics``)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from safedl.serve.metrics import LATENCY_BUCKETS

V = ["version_role", "bundle_version"]


class RolloutMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.requests = Counter("safedl_version_requests", "predict requests by version and status class (2xx, "
                                "4xx, 5xx)", V + ["status"], registry=r)
        self.latency = Histogram("safedl_version_request_latency_seconds", "predict latency by version (admitted "
                                 "to answered)", V, buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("safedl_version_images", "images answered by version", V, registry=r)
        self.rejected = Counter("safedl_version_images_rejected", "images rejected by version", V, registry=r)
        self.alarms = Counter("safedl_version_detector_alarms", "images a detector flagged, by version", V,
                              registry=r)
        self.compared = Counter("safedl_version_compared", "images answered by both versions (source: traffic "
                                "for a shadow, probe for the controller's probe runs)", V + ["source"], registry=r)
        self.disagreements = Counter("safedl_version_disagreements", "compared images whose answer (label or "
                                     "rejection) differs from the stable version's", V + ["source"], registry=r)
        self.shadow_dropped = Counter("safedl_shadow_dropped", "traffic batches not compared because the shadow "
                                      "queue was full", registry=r)
        self.probe = Gauge("safedl_rollout_probe_metric", "the last probe evaluation per version (clean_accuracy, "
                           "robust_accuracy, backdoor_asr, p99_latency_seconds)", V + ["metric"], registry=r)
        self.decisions = Counter("safedl_rollout_decisions", "rollout decisions (start, progress, promote, "
                                 "rollback, abort)", ["decision"], registry=r)
        self.failed_checks = Counter("safedl_rollout_failed_checks", "checks that failed an evaluation", ["check"],
                                     registry=r)
        self.fraction = Gauge("safedl_rollout_canary_fraction", "share of keys routed to the canary", registry=r)
        for d in ("start", "progress", "promote", "rollback", "abort"):
            self.decisions.labels(d)

    def request(self, role: str, version: str, *, status: int, latency_s: float) -> None:
        self.requests.labels(role, version, f"{status // 100}xx").inc()
        if status < 500:
            self.latency.labels(role, version).observe(latency_s)

    def answered(self, role: str, version: str, *, reasons: list) -> None:
        self.images.labels(role, version).inc(len(reasons))
        self.rejected.labels(role, version).inc(sum(r is not None for r in reasons))
        self.alarms.labels(role, version).inc(sum(r is not None and r.startswith("detector:") for r in reasons))

    def compared_with_stable(self, role: str, version: str, *, n: int, differ: int, source: str) -> None:
        self.compared.labels(role, version, source).inc(n)
        self.disagreements.labels(role, version, source).inc(differ)
