"""Service SLOs as burn-rate alerts (serve/monitor/burn_rate.py, deploy/prometheus/burn_rate.yml): the shipped rule
file is the generator's output for the shipped SLO file; promtool accepts it; and promtool unit tests on synthetic
series show each alert firing when the budget burns too fast and staying silent when it does not."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from _binaries import required_binary

pytest.importorskip("prometheus_client")

from safedl.errors import UserError  # noqa: E402
from safedl.serve.monitor.burn_rate import burn_rate_rules, load_service_slo, render_rules  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SLO_FILE = ROOT / "deploy" / "prometheus" / "service_slo.yml"
RULES = ROOT / "deploy" / "prometheus" / "burn_rate.yml"
LABELS = 'instance="a:8000",job="safedl"'


def _promtool() -> str:
    return required_binary("promtool", package="prometheus")


def test_the_shipped_rules_are_the_generated_rules_of_the_shipped_slo():
    assert RULES.read_text(encoding="utf-8") == render_rules(load_service_slo(SLO_FILE), source=SLO_FILE.name)


def test_thresholds_are_the_workbook_s_factors_of_the_budget():
    rules = burn_rate_rules(load_service_slo(SLO_FILE))["groups"][1]["rules"]
    exprs = {r["alert"]: r["expr"] for r in rules}
    assert "> 0.0144 and" in exprs["SafedlSLOFastBurn_availability"]  # 14.4 x (1 - 0.999)
    assert "> 0.006 and" in exprs["SafedlSLOSlowBurn_availability"]    # 6 x (1 - 0.999)
    assert "> 0.144 and" in exprs["SafedlSLOFastBurn_latency"]         # 14.4 x (1 - 0.99)


@pytest.mark.parametrize("text, match", [
    ("objectives: []", "objectives"),
    ("objectives: [{name: lat, sli: latency, target: 0.99, threshold_s: 0.3}]", "threshold_s must be one of"),
    ("objectives: [{name: av, sli: availability, target: 1.5}]", "target"),
    ("objectives: [{name: av, sli: uptime, target: 0.9}]", "sli"),
    ("period_days: 30\nobjectives: [{name: a, sli: availability, target: 0.9}, "
     "{name: a, sli: availability, target: 0.99}]", "unique"),
])
def test_a_bad_slo_file_is_one_clear_error(tmp_path, text, match):
    path = tmp_path / "slo.yml"
    path.write_text(text)
    with pytest.raises(UserError, match=match) as err:
        load_service_slo(path)
    assert str(path) in str(err.value)


def test_promtool_checks_the_rules():
    r = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS" in r.stdout + r.stderr, r.stdout + r.stderr


def _availability(ok_per_min: int, errors_per_min: int, minutes: int) -> list[dict]:
    return [{"series": f'safedl_requests_total{{endpoint="/v1/predict",status="200",{LABELS}}}',
             "values": f"0+{ok_per_min}x{minutes}"},
            {"series": f'safedl_requests_total{{endpoint="/v1/predict",status="503",{LABELS}}}',
             "values": f"0+{errors_per_min}x{minutes}"}]


def _latency(total_per_min: int, fast_per_min: int, minutes: int) -> list[dict]:
    base = 'safedl_request_latency_seconds_{}{{endpoint="/v1/predict",{}{}}}'
    return [{"series": base.format("count", "", LABELS), "values": f"0+{total_per_min}x{minutes}"},
            {"series": base.format("bucket", 'le="0.25",', LABELS), "values": f"0+{fast_per_min}x{minutes}"}]


def _expect(alerts: dict, name: str, firing: bool) -> dict:
    rule = alerts[name]
    exp = [{"exp_labels": {**rule["labels"], "instance": "a:8000", "job": "safedl"},
            "exp_annotations": rule["annotations"]}] if firing else []
    return {"alertname": name, "exp_alerts": exp}


# (series, minutes, eval time, {alert: firing}): a 2.9% error ratio burns the 0.1% budget 29x (both fire); 1%
# burns it 10x (the slow alert only, once 6 h of it are in); 0.05% is within budget; 20% slow answers against
# the 1% latency budget (both), 5% (the slow alert: 5x < 6x, neither)
SCENARIOS = [
    (_availability(100, 3, 120), "70m", {"SafedlSLOFastBurn_availability": True,
                                         "SafedlSLOSlowBurn_availability": True}),
    (_availability(100, 1, 420), "400m", {"SafedlSLOFastBurn_availability": False,
                                          "SafedlSLOSlowBurn_availability": True}),
    (_availability(2000, 1, 420), "400m", {"SafedlSLOFastBurn_availability": False,
                                           "SafedlSLOSlowBurn_availability": False}),
    (_latency(100, 80, 120), "70m", {"SafedlSLOFastBurn_latency": True, "SafedlSLOSlowBurn_latency": True}),
    (_latency(100, 95, 420), "400m", {"SafedlSLOFastBurn_latency": False, "SafedlSLOSlowBurn_latency": False}),
]


def test_promtool_unit_tests_fire_on_a_fast_or_slow_burn_and_stay_silent_within_budget(tmp_path):
    alerts = {r["alert"]: r for r in burn_rate_rules(load_service_slo(SLO_FILE))["groups"][1]["rules"]}
    tests = [{"interval": "1m", "input_series": series,
              "alert_rule_test": [{"eval_time": at, **_expect(alerts, name, firing)} for name, firing in want.items()]}
             for series, at, want in SCENARIOS]
    shutil.copy(RULES, tmp_path / "burn_rate.yml")
    spec = tmp_path / "burn_rate_test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": ["burn_rate.yml"], "evaluation_interval": "1m", "tests": tests}))
    r = subprocess.run([_promtool(), "test", "rules", str(spec)], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0 and "SUCCESS" in r.stdout + r.stderr, r.stdout + r.stderr
