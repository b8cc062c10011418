"""The monitor's Prometheus metrics, registered in the service's registry (names shared with the dashboards and
``deploy/prometheus/alerts.yml``)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_TTD_BUCKETS = (10, 25, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
_TTM_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class MonitorMetrics:
    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.flags = Counter("safedl_query_flags", "keys newly flagged by a query detector", ["detector"], registry=r)
        self.anomalous = Counter("safedl_query_anomalous", "queries judged anomalous by a query detector",
                                 ["detector"], registry=r)
        self.extraction = Counter("safedl_extraction_attempts", "keys flagged by an extraction detector (PRADA)",
                                  registry=r)
        self.ttd = Histogram("safedl_time_to_detect_queries", "a key's query number at its first flag",
                             ["detector"], buckets=_TTD_BUCKETS, registry=r)
        # with workers, each worker's monitor fires its own alerts (rows of their own): the sum over the live ones
        self.firing = Gauge("safedl_alerts_firing", "alerts firing now", ["rule", "severity"],
                            multiprocess_mode="livesum", registry=r)
        self.fired = Counter("safedl_alerts_fired", "alerts that started firing", ["rule", "severity"], registry=r)
        self.escalations = Counter("safedl_alert_escalations", "firing alerts whose graded severity rose, by the "
                                   "new severity", ["rule", "severity"], registry=r)
        self.suppressed = Counter("safedl_alerts_suppressed", "firings that re-opened an alert resolved less than "
                                  "routing.suppress_s ago (not notified again)", ["rule"], registry=r)
        self.ttm = Histogram("safedl_time_to_mitigate_seconds", "seconds from a key's first query-detector flag to "
                             "an automatic action on it", ["action"], buckets=_TTM_BUCKETS, registry=r)
        self.notifications = Counter("safedl_alert_notifications", "alert notifications by sink and outcome",
                                     ["sink", "outcome"], registry=r)
        self.actions = Counter("safedl_key_actions", "automatic key actions taken", ["action"], registry=r)
        self.dropped = Counter("safedl_monitor_dropped", "predict batches not observed (monitor queue full)",
                               registry=r)
        self.work = Histogram("safedl_monitor_observe_seconds", "monitor worker time per predict batch (detectors, "
                              "windows, rules), off the request path",
                              buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0), registry=r)

    def count_notification(self, sink: str, outcome: str) -> None:
        self.notifications.labels(sink, outcome).inc()
