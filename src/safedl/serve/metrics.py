"""Prometheus metrics (``safedl_`` prefix), one registry per app so several apps can live in one process."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SCORE_BUCKETS = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 100.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("safedl_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.latency = Histogram("safedl_request_latency_seconds", "request latency (receipt to answer)",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.images = Counter("safedl_images_predicted", "images run through the pipeline", registry=r)
        self.rejected = Counter("safedl_images_rejected", "images rejected by the pipeline, by reason", ["reason"],
                                registry=r)
        self.detector_score = Histogram("safedl_detector_score", "detector scores of every image", ["detector"],
                                        buckets=_SCORE_BUCKETS, registry=r)
        self.tier = Counter("safedl_tier_requests", "predict requests answered, by output tier", ["tier"], registry=r)
        self.rate_limited = Counter("safedl_rate_limited", "requests refused by the rate limit or quota", ["kind"],
                                    registry=r)
        self.input_errors = Counter("safedl_input_errors", "requests refused for their input, by reason", ["code"],
                                    registry=r)
        self.audit_failures = Counter("safedl_audit_failures", "requests answered 503 because the audit failed",
                                      registry=r)
        self.batch_size = Histogram("safedl_batch_size", "images per forward pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.stage_latency = Histogram("safedl_stage_latency_seconds", "time per request stage (read, admit, "
                                       "decode, model, audit)", ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ready = Gauge("safedl_ready", "1 when the bundle is loaded and the audit log writable", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
