"""The red team's Prometheus textfile (node_exporter's textfile collector format), written atomically.

Every gauge carries ``attack``, ``eps`` and ``bundle_version``; a value not measured (no detection, no release
number) has no series rather than a made-up one. Names are listed in ``METRICS`` (docs: README, "Continuous red
team").
"""
from __future__ import annotations

import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from safedl.redteam.outcome import AttackOutcome
from safedl.redteam.slo import Breach

LABELS = ("attack", "eps", "bundle_version")
METRICS = {
    "safedl_redteam_robust_accuracy": "robust accuracy through the serving path (rejected or correct)",
    "safedl_redteam_robust_accuracy_ci95_lower": "lower bound of its 95% Wilson interval",
    "safedl_redteam_robust_accuracy_ci95_upper": "upper bound of its 95% Wilson interval",
    "safedl_redteam_backdoor_asr": "backdoor attack success rate of the replayed triggered probes",
    "safedl_redteam_backdoor_asr_ci95_lower": "lower bound of its 95% Wilson interval",
    "safedl_redteam_backdoor_asr_ci95_upper": "upper bound of its 95% Wilson interval",
    "safedl_redteam_n": "probes measured",
    "safedl_redteam_queries": "images sent for the attack",
    "safedl_redteam_queries_to_detection": "adversarial images sent until the service first rejected one of them "
                                           "or blocked the key (clean probes not counted)",
    "safedl_redteam_adversarial_queries": "adversarial images sent for the attack (not the clean probes)",
    "safedl_redteam_clean_queries": "clean probes the attack sent unchanged (e.g. HopSkipJump's first query)",
    "safedl_redteam_false_alarms": "of them, rejected by the service (false alarms, not detections)",
    "safedl_redteam_false_alarm_rate_ci95_lower": "lower bound of the false-alarm rate's 95% Wilson interval",
    "safedl_redteam_false_alarm_rate_ci95_upper": "upper bound of the false-alarm rate's 95% Wilson interval",
    "safedl_redteam_detected": "1 when the service detected the attack (a rejection or a blocked key)",
    "safedl_redteam_stopped_early": "1 when the attack ran out of budget or was blocked (fewer probes measured)",
    "safedl_redteam_release_robust_accuracy": "the release's measured robust accuracy (bundle manifest)",
    "safedl_redteam_slo_breached": "1 when the run broke an SLO (labels: check, attack)",
    "safedl_redteam_last_run_timestamp_seconds": "when the run finished (Unix time)",
    "safedl_redteam_run_seconds": "how long the run took",
}


def _gauges(reg: CollectorRegistry) -> dict[str, Gauge]:
    special = {"safedl_redteam_slo_breached": ("check", "attack", "bundle_version"),
               "safedl_redteam_last_run_timestamp_seconds": ("bundle_version",),
               "safedl_redteam_run_seconds": ("bundle_version",)}
    return {n: Gauge(n, h, special.get(n, LABELS), registry=reg) for n, h in METRICS.items()}


def write_slis(path: Path, *, outcomes: list[AttackOutcome], bundle_version: str, release: dict[str, float],
               breaches: list[Breach], started: float) -> None:
    """Write the run's metrics to ``path`` (a temporary file renamed over it: a scrape never sees half a file)."""
    reg = CollectorRegistry()
    g = _gauges(reg)
    for o in outcomes:
        lab = (o.attack, o.eps, bundle_version)
        base = "safedl_redteam_backdoor_asr" if o.kind == "backdoor" else "safedl_redteam_robust_accuracy"
        if o.n:
            lo, hi = o.ci95
            g[base].labels(*lab).set(o.value)
            g[base + "_ci95_lower"].labels(*lab).set(lo)
            g[base + "_ci95_upper"].labels(*lab).set(hi)
        g["safedl_redteam_n"].labels(*lab).set(o.n)
        g["safedl_redteam_queries"].labels(*lab).set(o.queries)
        g["safedl_redteam_detected"].labels(*lab).set(0 if o.queries_to_detection is None else 1)
        if o.queries_to_detection is not None:
            g["safedl_redteam_queries_to_detection"].labels(*lab).set(o.queries_to_detection)
        g["safedl_redteam_adversarial_queries"].labels(*lab).set(o.adversarial_queries)
        g["safedl_redteam_clean_queries"].labels(*lab).set(o.clean_queries)
        g["safedl_redteam_false_alarms"].labels(*lab).set(o.false_alarms)
        if o.clean_queries:
            lo, hi = o.false_alarm_ci95
            g["safedl_redteam_false_alarm_rate_ci95_lower"].labels(*lab).set(lo)
            g["safedl_redteam_false_alarm_rate_ci95_upper"].labels(*lab).set(hi)
        g["safedl_redteam_stopped_early"].labels(*lab).set(0 if o.stopped is None else 1)
        if o.kind == "robust" and o.attack in release:
            g["safedl_redteam_release_robust_accuracy"].labels(*lab).set(release[o.attack])
    for b in breaches:
        g["safedl_redteam_slo_breached"].labels(b.check, b.attack, bundle_version).set(1)
    g["safedl_redteam_last_run_timestamp_seconds"].labels(bundle_version).set(time.time())
    g["safedl_redteam_run_seconds"].labels(bundle_version).set(time.monotonic() - started)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), reg)
