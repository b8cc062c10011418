"""Writes deploy/grafana/safedl.json: the executive, on-call and debug dashboards of `safedl serve` as Grafana
dashboard JSON models (schemaVersion 39) under ``"dashboards"``; docs/runbook.md says how to import them.

    python deploy/grafana/build_dashboards.py          # rewrite safedl.json
    python deploy/grafana/build_dashboards.py --split DIR   # one file per dashboard, for Grafana file provisioning

tests/test_deploy_monitoring.py checks that safedl.json is this script's output and that every query uses metrics
the service exports (or recording rules of deploy/prometheus/alerts.yml).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().with_name("safedl.json")
RULES = Path(__file__).resolve().parents[1] / "prometheus" / "alerts.yml"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'instance=~"$instance"'


def slo_targets() -> dict[str, float]:
    """The SLO targets of alerts.yml (its ``safedl:slo_target:<name>`` recording rules), so the dashboards' threshold
    lines and the alerts use the same numbers."""
    import yaml

    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    out = {}
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("record", "").startswith("safedl:slo_target:"):
                m = re.fullmatch(r"\s*vector\(\s*(-?[0-9.]+)\s*\)\s*", rule["expr"])
                if m is None:
                    raise ValueError(f"{RULES}: {rule['record']}: expected vector(<number>), got {rule['expr']!r}")
                out[rule["record"].rsplit(":", 1)[1]] = float(m.group(1))
    return out


def _target(expr: str, legend: str = "", ref: str = "A", fmt: str = "time_series") -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "format": fmt}


def _panel(pid: int, title: str, kind: str, targets: list[dict], grid: tuple[int, int, int, int], *,
           unit: str = "short", thresholds: list[tuple[str, float | None]] | None = None, desc: str = "",
           options: dict | None = None) -> dict:
    x, y, w, h = grid
    steps = [{"color": c, "value": v} for c, v in (thresholds or [("green", None)])]
    return {"id": pid, "type": kind, "title": title, "description": desc, "datasource": DS,
            "gridPos": {"x": x, "y": y, "w": w, "h": h},
            "targets": [dict(t, refId=chr(65 + i)) for i, t in enumerate(targets)],
            "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
                            "overrides": []},
            "options": options or {}}


def _templating(extra: list[dict] | None = None) -> dict:
    return {"list": [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus",
         "current": {}, "hide": 0},
        {"name": "instance", "type": "query", "datasource": DS, "label": "instance",
         "query": {"query": "label_values(safedl_ready, instance)", "refId": "instance"},
         "definition": "label_values(safedl_ready, instance)", "includeAll": True, "multi": True,
         "current": {}, "refresh": 2, "hide": 0},
        *(extra or [])]}


def _dashboard(uid: str, title: str, desc: str, panels: list[dict], extra_vars: list[dict] | None = None) -> dict:
    return {"uid": uid, "title": title, "description": desc, "tags": ["safedl"], "timezone": "utc",
            "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"}, "templating": _templating(extra_vars),
            "annotations": {"list": []},
            "links": [{"type": "dashboards", "tags": ["safedl"], "asDropdown": False, "title": "safedl",
                       "includeVars": True, "keepTime": True}],
            "panels": panels}


def executive() -> dict:
    red_above = lambda t: [("green", None), ("red", t)]  # noqa: E731
    t = slo_targets()
    asr, recall, delta = (t["adversarial_success_rate_max"], t["detection_recall_min"],
                          t["clean_accuracy_delta_min"])
    p = [
        _panel(1, "Bundle in service", "table", [_target(f"safedl_bundle_info{{{SEL}}}", fmt="table")], (0, 0, 24, 4),
               desc="version and defense of the bundle each instance serves (changes on every swap)"),
        _panel(2, f"Adversarial success rate per attack (target <= {asr:g})", "bargauge",
               [_target(f"safedl_bundle_adversarial_success_rate{{{SEL}}}", "{{attack}}")], (0, 4, 12, 7),
               unit="percentunit", thresholds=red_above(asr),
               desc="measured by the run that produced the bundle (manifest); "
                    "alert SafedlAdversarialSuccessRateAboveTarget"),
        _panel(3, "Robust accuracy per attack", "bargauge",
               [_target(f"safedl_bundle_robust_accuracy{{{SEL}}}", "{{attack}}")], (12, 4, 12, 7), unit="percentunit"),
        _panel(4, f"Detection recall and precision (recall target >= {recall:g})", "bargauge",
               [_target(f"safedl_bundle_detection_recall{{{SEL}}}", "recall {{detector}}"),
                _target(f"safedl_bundle_detection_precision{{{SEL}}}", "precision {{detector}}")], (0, 11, 12, 7),
               unit="percentunit", thresholds=[("red", None), ("green", recall)]),
        _panel(5, f"Clean accuracy and its delta to the undefended model (delta target >= {delta:g})", "stat",
               [_target(f"safedl_bundle_clean_accuracy{{{SEL}}}", "clean accuracy"),
                _target(f"safedl_bundle_clean_accuracy_delta{{{SEL}}}", "delta")], (12, 11, 12, 7),
               unit="percentunit"),
        _panel(6, "Attacks stopped (range)", "stat",
               [_target(f"sum(increase(safedl_images_rejected_total{{{SEL}}}[$__range]))", "inputs rejected"),
                _target(f"sum(increase(safedl_query_flags_total{{{SEL}}}[$__range]))", "keys flagged"),
                _target(f"sum(increase(safedl_extraction_attempts_total{{{SEL}}}[$__range]))", "extraction attempts"),
                _target(f"sum(increase(safedl_key_actions_total{{{SEL}}}[$__range]))", "keys throttled/blocked")],
               (0, 18, 24, 5)),
        _panel(7, "Images answered and rejected", "timeseries",
               [_target(f"sum(rate(safedl_images_predicted_total{{{SEL}}}[5m]))", "answered/s"),
                _target(f"sum(rate(safedl_images_rejected_total{{{SEL}}}[5m]))", "rejected/s")], (0, 23, 24, 7)),
        # `safedl redteam` (textfile collector: its own instance, so no $instance filter); alert 2 points below
        _panel(8, "Red team: robust accuracy through the serving path vs the release (alert 2 points below)",
               "timeseries",
               [_target("safedl_redteam_robust_accuracy", "red team {{attack}} eps={{eps}} {{bundle_version}}"),
                _target("safedl_redteam_release_robust_accuracy", "release {{attack}} eps={{eps}}"),
                _target("safedl_redteam_backdoor_asr", "backdoor ASR {{attack}}")], (0, 30, 24, 7),
               unit="percentunit", desc="safedl redteam's last run per attack and eps (README: Continuous red "
               "team); the release line is the bundle manifest's measured value."),
    ]
    return _dashboard("safedl-executive", "safedl: executive", "Robustness SLIs of the served bundle against their "
                      "targets, and what the service stopped.", p)


def oncall() -> dict:
    p = [
        _panel(1, "Prometheus alerts firing (alerts.yml)", "table",
               [_target('ALERTS{alertstate="firing", alertname=~"Safedl.*"}', fmt="table")], (0, 0, 12, 6)),
        _panel(2, "Security monitor alerts firing", "timeseries",
               [_target(f"sum by (rule, severity) (safedl_alerts_firing{{{SEL}}})", "{{rule}} ({{severity}})")],
               (12, 0, 12, 6)),
        _panel(3, "Keys flagged by query detector", "timeseries",
               [_target(f"sum by (detector) (increase(safedl_query_flags_total{{{SEL}}}[5m]))", "{{detector}}"),
                _target(f"sum(increase(safedl_extraction_attempts_total{{{SEL}}}[5m]))", "extraction")],
               (0, 6, 12, 7)),
        _panel(4, "Anomalous queries by detector", "timeseries",
               [_target(f"sum by (detector) (rate(safedl_query_anomalous_total{{{SEL}}}[5m]))", "{{detector}}")],
               (12, 6, 12, 7), unit="reqps"),
        _panel(5, "Top rejection reasons (1h)", "bargauge",
               [_target(f"topk(10, sum by (reason) (increase(safedl_images_rejected_total{{{SEL}}}[1h])))",
                        "{{reason}}")], (0, 13, 12, 7)),
        _panel(6, "Rejection ratio vs its 1h baseline", "timeseries",
               [_target(f"safedl:rejection_ratio:rate5m{{{SEL}}}", "5m {{instance}}"),
                _target(f"safedl:rejection_ratio:rate1h{{{SEL}}}", "1h baseline {{instance}}")], (12, 13, 12, 7),
               unit="percentunit"),
        _panel(7, "Predict latency p50 / p99", "timeseries",
               [_target("histogram_quantile(0.5, sum by (le) (rate(safedl_request_latency_seconds_bucket"
                        f'{{{SEL}, endpoint="/v1/predict"}}[5m])))', "p50"),
                _target("histogram_quantile(0.99, sum by (le) (rate(safedl_request_latency_seconds_bucket"
                        f'{{{SEL}, endpoint="/v1/predict"}}[5m])))', "p99")], (0, 20, 12, 7), unit="s",
               thresholds=[("green", None), ("red", slo_targets()["latency_p99_seconds_max"])]),
        _panel(8, "Requests by endpoint and status", "timeseries",
               [_target(f"sum by (endpoint, status) (rate(safedl_requests_total{{{SEL}}}[5m]))",
                        "{{endpoint}} {{status}}")], (12, 20, 12, 7), unit="reqps"),
        _panel(9, "Rate limited", "timeseries",
               [_target(f"sum by (kind) (rate(safedl_rate_limited_total{{{SEL}}}[5m]))", "{{kind}}")],
               (0, 27, 8, 6), unit="reqps"),
        _panel(10, "Automatic key actions (1h)", "stat",
               [_target(f"sum by (action) (increase(safedl_key_actions_total{{{SEL}}}[1h]))", "{{action}}")],
               (8, 27, 8, 6)),
        _panel(11, "Ready / bundle swaps (1h)", "stat",
               [_target(f"min(safedl_ready{{{SEL}}})", "ready"),
                _target(f"sum by (outcome) (increase(safedl_bundle_swaps_total{{{SEL}}}[1h]))", "swaps {{outcome}}")],
               (16, 27, 8, 6)),
        _panel(12, "Alert notifications by sink and outcome", "timeseries",
               [_target(f"sum by (sink, outcome) (increase(safedl_alert_notifications_total{{{SEL}}}[5m]))",
                        "{{sink}} {{outcome}}")], (0, 33, 24, 6)),
        _panel(13, "Drift: p-value of the latest global window (alarm at <= 0.005)", "timeseries",
               [_target(f"min by (test) (safedl_drift_p_value{{{SEL}}})", "{{test}}")], (0, 39, 12, 7),
               unit="short", thresholds=[("red", None), ("green", 0.005)],
               desc="MMD permutation test on the penultimate features (input) and chi-square on the predicted "
                    "labels (prediction), one window of drift.window images against the bundle's reference"),
        _panel(14, "Drift windows by outcome (1h)", "timeseries",
               [_target(f"sum by (test, scope, outcome) (increase(safedl_drift_windows_total{{{SEL}}}[1h]))",
                        "{{test}} {{scope}} {{outcome}}")], (12, 39, 12, 7)),
    ]
    return _dashboard("safedl-oncall", "safedl: on-call", "What is firing, who is attacking, and whether the service "
                      "is healthy. First responses: docs/runbook.md.", p)


def debug() -> dict:
    det_var = {"name": "detector", "type": "query", "datasource": DS, "label": "input detector",
               "query": {"query": "label_values(safedl_detector_score_band_total, detector)", "refId": "detector"},
               "definition": "label_values(safedl_detector_score_band_total, detector)", "includeAll": True,
               "multi": True, "current": {}, "refresh": 2, "hide": 0}
    heat = {"calculate": False, "yAxis": {"unit": "short"}, "cellGap": 1}
    p = [
        _panel(1, "Input detector scores (bands of score / threshold)", "timeseries",
               [_target("sum by (band) (increase(safedl_detector_score_band_total"
                        f'{{{SEL}, detector=~"$detector"}}[$__rate_interval]))', "{{band}}")],
               (0, 0, 12, 8)),
        _panel(2, "Batch sizes", "heatmap",
               [_target(f"sum by (le) (increase(safedl_batch_size_bucket{{{SEL}}}[$__rate_interval]))", "{{le}}",
                        fmt="heatmap")], (12, 0, 12, 8), options=heat),
        _panel(3, "Per-stage latency p99", "timeseries",
               [_target("histogram_quantile(0.99, sum by (le, stage) (rate(safedl_stage_latency_seconds_bucket"
                        f"{{{SEL}}}[5m])))", "{{stage}}")], (0, 8, 12, 8), unit="s"),
        _panel(4, "Audit failures (requests answered 503)", "timeseries",
               [_target(f"sum(increase(safedl_audit_failures_total{{{SEL}}}[5m]))", "audit failures")],
               (12, 8, 12, 8), thresholds=[("green", None), ("red", 1)]),
        _panel(5, "Queries until a key is flagged (median, p90)", "timeseries",
               [_target("histogram_quantile(0.5, sum by (le, detector) (rate(safedl_time_to_detect_queries_bucket"
                        f"{{{SEL}}}[1h])))", "p50 {{detector}}"),
                _target("histogram_quantile(0.9, sum by (le, detector) (rate(safedl_time_to_detect_queries_bucket"
                        f"{{{SEL}}}[1h])))", "p90 {{detector}}")], (0, 16, 12, 7)),
        _panel(6, "Input errors by code", "timeseries",
               [_target(f"sum by (code) (rate(safedl_input_errors_total{{{SEL}}}[5m]))", "{{code}}")],
               (12, 16, 12, 7), unit="reqps"),
        _panel(7, "Predict requests by output tier", "timeseries",
               [_target(f"sum by (tier) (rate(safedl_tier_requests_total{{{SEL}}}[5m]))", "{{tier}}")],
               (0, 23, 12, 7), unit="reqps"),
        _panel(8, "Images per second through the model", "timeseries",
               [_target(f"sum(rate(safedl_images_predicted_total{{{SEL}}}[5m]))", "images/s"),
                _target(f"sum(rate(safedl_batch_size_count{{{SEL}}}[5m]))", "forward passes/s")], (12, 23, 12, 7)),
    ]
    return _dashboard("safedl-debug", "safedl: debug", "Detector score distributions, batching, per-stage latency, "
                      "audit failures.", p, [det_var])


def build() -> dict:
    return {"dashboards": [executive(), oncall(), debug()]}


def main(argv: list[str]) -> None:
    doc = build()
    if argv[:1] == ["--split"] and len(argv) == 2:
        out = Path(argv[1])
        out.mkdir(parents=True, exist_ok=True)
        for d in doc["dashboards"]:
            (out / f"{d['uid']}.json").write_text(json.dumps(d, indent=2) + "\n", encoding="utf-8")
        return
    OUT.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1:])
