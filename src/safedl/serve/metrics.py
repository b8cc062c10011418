"""Prometheus metrics (``safedl_`` prefix), one registry per app so several apps can live in one process.

With ``safedl serve --workers N`` (serve/workers.py) prometheus_client runs in multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``, set by the supervisor before a worker starts): every worker writes its counters and
histograms to files there, and ``render`` merges all workers' files (the dead ones' too, so a total never goes back),
so any worker's ``/metrics`` reports the whole service. Gauges say how they merge (``safedl_ready``: the minimum
over the live workers). Custom collectors (``register_collector``: the bundle SLIs) report the answering worker's
state, which every worker shares (the same bundle; after a SIGHUP each worker reloads it).

Nothing here is per key, and detector scores are exported only as coarse bands of score / threshold, never as a
histogram: a histogram's ``_sum`` moves by exactly one request's score at low traffic, so its deltas would hand a
label-tier key (no scores by contract) the scores it is not shown. ``/metrics`` itself needs a key with the
``metrics`` (or ``admin``) scope.
"""
from __future__ import annotations

import bisect
import os
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.registry import Collector

from safedl.serve.connection_limits import ProtocolStats

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# bands of score / threshold: well below, approaching, over, far over
SCORE_BANDS = ((0.5, "lt_0.5"), (1.0, "0.5_1"), (2.0, "1_2"), (float("inf"), "ge_2"))


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("safedl_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.latency = Histogram("safedl_request_latency_seconds", "request latency (receipt to answer)",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("safedl_images_predicted", "images run through the pipeline", registry=r)
        self.rejected = Counter("safedl_images_rejected", "images rejected by the pipeline, by reason", ["reason"],
                                registry=r)
        self.score_band = Counter("safedl_detector_score_band", "images by detector and band of score / threshold "
                                  "(lt_0.5, 0.5_1, 1_2, ge_2)", ["detector", "band"], registry=r)
        self.unauthenticated = Counter("safedl_unauthenticated", "requests refused before authentication, by code",
                                       ["code"], registry=r)
        self.unauth_dropped = Counter("safedl_unauthenticated_dropped", "failures before authentication not "
                                      "written to the audit database (it is past its share of the cap)", registry=r)
        self.tier = Counter("safedl_tier_requests", "predict requests answered, by output tier", ["tier"], registry=r)
        self.rate_limited = Counter("safedl_rate_limited", "requests refused by the rate limit or quota", ["kind"],
                                    registry=r)
        self.input_errors = Counter("safedl_input_errors", "requests refused for their input, by reason", ["code"],
                                    registry=r)
        self.audit_failures = Counter("safedl_audit_failures", "requests answered 503 because the audit failed",
                                      registry=r)
        self.detector_failures = Counter("safedl_detector_failures", "requests whose detector failed (raised, timed "
                                         "out, no finite score), by detector and the bundle's policy (fail_closed: "
                                         "answered 503; fail_open: answered without it)", ["detector", "policy"],
                                         registry=r)
        self.output_sanity = Counter("safedl_output_sanity_rejected", "images refused by an output sanity check "
                                     "(check: overconfident_far, a confident answer far from the training data)",
                                     ["check"], registry=r)
        self.input_cache = Counter("safedl_input_cache", "items of predict requests by input cache outcome (hit: "
                                   "decoding skipped, everything else done)", ["outcome"], registry=r)
        self.batch_size = Histogram("safedl_batch_size", "images per forward pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.stage_latency = Histogram("safedl_stage_latency_seconds", "time per request stage (read, admit, "
                                       "decode, model, audit)", ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.ready = Gauge("safedl_ready", "1 when the bundle is loaded and the audit log writable (workers: the "
                           "minimum over the live ones)", multiprocess_mode="livemin", registry=r)
        self._collectors: list[Collector] = []

    def observe_decision(self, d: dict, *, tier: str) -> None:
        """Count one request's answered images (a Decision slice): totals, rejections, score bands."""
        self.images.inc(len(d["reasons"]))
        self.tier.labels(tier).inc()
        for reason in d["reasons"]:
            if reason is not None:
                self.rejected.labels(reason).inc()
                if reason.startswith("sanity:"):
                    self.output_sanity.labels(reason.removeprefix("sanity:")).inc()
        for name in d.get("detector_failures") or {}:
            self.detector_failures.labels(name, "fail_open").inc()
        bounds = [b for b, _ in SCORE_BANDS[:-1]]
        for name, scores in d["detector_scores"].items():
            threshold = float(d.get("thresholds", {}).get(name) or 0.0)
            counts = [0] * len(SCORE_BANDS)
            # a request has a few images: one tolist and Python comparisons beat a dozen tiny tensor ops
            for score in scores.tolist():
                ratio = abs(score) / threshold if threshold > 0 else float("inf")
                counts[bisect.bisect_right(bounds, ratio) if ratio == ratio else len(bounds)] += 1
            for (_, band), n in zip(SCORE_BANDS, counts):
                if n:
                    self.score_band.labels(name, band).inc(n)

    def watch_connections(self, stats: ProtocolStats) -> None:
        """Export the HTTP protocol's connection events (serve/protocol.py: header timeouts, refused connections,
        lingering closes) as ``safedl_connection_events_total{event}``: a counter the protocol's ``stats`` increment
        (``stats.subscribe``), so the workers' counts add up like every other counter."""
        events = Counter("safedl_connection_events", "connection-level refusals and timeouts, by event", ["event"],
                         registry=self.registry)
        stats.subscribe(lambda event: events.labels(event).inc())
        for event, n in sorted(dict(stats).items()):
            events.labels(event).inc(n)  # every event has its series (0 until it happens)

    def register_collector(self, collector: Collector) -> None:
        """Add a custom collector (its state is this process's, also in multiprocess mode)."""
        self.registry.register(collector)
        self._collectors.append(collector)

    def render(self) -> bytes:
        """The exposition of this app; with workers, of all of them (plus this process's custom collectors), listing
        the same families as one process does (a labelled metric no worker has used yet: its HELP and TYPE)."""
        path = os.environ.get(MULTIPROC_ENV)
        if not path:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess
        from prometheus_client.metrics_core import Metric

        families = [*multiprocess.MultiProcessCollector(None, path=path).collect(),
                    *(f for c in self._collectors for f in c.collect())]
        present = {f.name for f in families}
        families += [Metric(f.name, f.documentation, f.type, f.unit) for f in self.registry.collect()
                     if f.name not in present and not f.samples]
        return generate_latest(_Families(families))


class _Families(Collector):
    """Metric families collected already, as a collector for ``generate_latest``."""

    def __init__(self, families: list):
        self.families = families

    def collect(self) -> Iterator:
        return iter(self.families)
