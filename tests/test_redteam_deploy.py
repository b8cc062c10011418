"""The red team's shipped operations files: deploy/prometheus/redteam.yml (promtool check + unit tests, every alert
tested firing and silent, a runbook entry each), the executive dashboard's red-team panel, the Kubernetes CronJob
(validated against the Kubernetes schemas as tests/test_deploy_manifests.py does) and the systemd timer
(`systemd-analyze verify`), all held to the flags of `safedl redteam --help` and the metrics it writes."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from _binaries import required_binary
from _manifests import K8S, ROOT, load_docs, one
from test_deploy_manifests import SCHEMA_VERSIONS, _validate, _validator
from test_deploy_monitoring import TEXTFILE_METRICS, metric_names

from safedl.redteam.textfile import METRICS

RULES = ROOT / "deploy" / "prometheus" / "redteam.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "redteam_test.yml"
RUNBOOK = ROOT / "docs" / "redteam.md"
CRONJOB = K8S / "redteam" / "cronjob.yaml"
SYSTEMD = ROOT / "deploy" / "systemd"


def _redteam_flags() -> set[str]:
    env = dict(os.environ, COLUMNS="250", TERM="dumb", NO_COLOR="1",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "safedl.cli", "redteam", "--help"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out.stdout))
    assert {"--url", "--key-file", "--budget-s", "--out"} <= flags, out.stdout[:2000]
    return flags


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"] for r in g["rules"]]


def test_promtool_checks_and_unit_tests_the_red_team_rules():
    promtool = required_binary("promtool", package="prometheus")
    r = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS" in r.stdout + r.stderr, r.stdout + r.stderr
    r = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "SUCCESS" in r.stdout + r.stderr, r.stdout + r.stderr


def test_promtool_unit_tests_fail_when_the_two_point_margin_is_widened(tmp_path):
    """The unit tests pin the 2-point rule: with a 10-point margin the 5-point drop case no longer fires."""
    promtool = required_binary("promtool", package="prometheus")
    (tmp_path / "redteam.yml").write_text(RULES.read_text().replace("expr: vector(0.02)", "expr: vector(0.10)"))
    shutil.copy(RULE_TESTS, tmp_path / "redteam_test.yml")
    r = subprocess.run([promtool, "test", "rules", "redteam_test.yml"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode != 0 and "SafedlRedteamRobustAccuracyBelowRelease" in r.stdout + r.stderr


def test_every_alert_is_tested_firing_and_silent_and_has_a_runbook_entry():
    cases = [c for t in yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"] for c in t["alert_rule_test"]]
    anchors = {re.sub(r"[^a-z0-9-]", "", line.lstrip("#").strip().lower().replace(" ", "-"))
               for line in RUNBOOK.read_text(encoding="utf-8").splitlines() if line.startswith("#")}
    alerts = [r for r in _rules() if "alert" in r]
    assert {a["alert"] for a in alerts} >= {"SafedlRedteamRobustAccuracyBelowRelease", "SafedlRedteamStale"}
    for alert in alerts:
        name = alert["alert"]
        assert [c for c in cases if c["alertname"] == name and c.get("exp_alerts")], f"{name}: never fires"
        assert [c for c in cases if c["alertname"] == name and not c.get("exp_alerts")], f"{name}: never silent"
        assert alert["annotations"]["runbook_url"].split("#")[1] in anchors, f"{name}: no section in {RUNBOOK}"


def test_rules_and_dashboard_read_only_metrics_the_red_team_writes():
    records = {r["record"] for r in _rules() if "record" in r}
    used = set().union(*(metric_names(r["expr"]) for r in _rules()))
    doc = json.loads((ROOT / "deploy" / "grafana" / "safedl.json").read_text(encoding="utf-8"))
    panels = [p for d in doc["dashboards"] for p in d["panels"] if p["title"].startswith("Red team")]
    assert len(panels) == 1
    used_panel = set().union(*(metric_names(t["expr"]) for t in panels[0]["targets"]))
    assert used_panel == {"safedl_redteam_robust_accuracy", "safedl_redteam_release_robust_accuracy",
                          "safedl_redteam_backdoor_asr"}
    assert TEXTFILE_METRICS <= set(METRICS)  # what the service-side test lets through is really written
    assert (used | used_panel) - records <= set(METRICS), sorted((used | used_panel) - records - set(METRICS))


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_the_cronjob_validates_against_the_kubernetes_schemas(version):
    for doc in load_docs(CRONJOB):
        _validate(doc, version)


def test_the_validator_rejects_a_broken_cronjob(tmp_path):
    kv = _validator()
    (doc,) = load_docs(CRONJOB)
    doc["spec"]["concurrencyPolicy"] = ["Forbid"]
    with pytest.raises(kv.utils.ValidationError):
        _validate(doc, "latest")


def _cron_args() -> list[str]:
    job = one(load_docs(CRONJOB), "CronJob")["spec"]["jobTemplate"]["spec"]
    (c,) = job["template"]["spec"]["containers"]
    assert c["command"] == ["safedl"] and c["args"][0] == "redteam"
    return c["args"]


def test_the_cronjob_is_bounded_and_uses_only_real_flags():
    (cron,) = load_docs(CRONJOB)
    args, job = _cron_args(), cron["spec"]["jobTemplate"]["spec"]
    assert {a for a in args if a.startswith("--")} <= _redteam_flags()
    budget = float(args[args.index("--budget-s") + 1])
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and job["backoffLimit"] == 0
    assert budget < job["activeDeadlineSeconds"]
    assert args[args.index("--out") + 1].endswith(".prom")


def test_the_systemd_timer_and_service_verify_and_use_only_real_flags(tmp_path):
    tool = required_binary("systemd-analyze", package="systemd")
    service = (SYSTEMD / "safedl-redteam.service").read_text()
    (line,) = [x for x in service.splitlines() if x.startswith("ExecStart=")]
    argv = line.split("=", 1)[1].split()
    assert argv[:2] == ["/usr/local/bin/safedl", "redteam"]
    assert {a for a in argv if a.startswith("--")} <= _redteam_flags()
    assert float(argv[argv.index("--budget-s") + 1]) < float(re.search(r"TimeoutStartSec=(\d+)", service)[1])
    # verify a copy whose ExecStart names an executable that exists here (the unit's path is the install's)
    (tmp_path / "safedl-redteam.service").write_text(service.replace("/usr/local/bin/safedl", "/bin/true"))
    shutil.copy(SYSTEMD / "safedl-redteam.timer", tmp_path)
    r = subprocess.run([tool, "verify", "safedl-redteam.timer", "safedl-redteam.service"], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "safedl-redteam.service").write_text(service.replace("/usr/local/bin/safedl", "/no/such/safedl"))
    r = subprocess.run([tool, "verify", "safedl-redteam.service"], capture_output=True, text=True, timeout=60,
                       cwd=broken)
    assert r.returncode != 0 and "/no/such/safedl" in r.stdout + r.stderr, r.stdout + r.stderr
