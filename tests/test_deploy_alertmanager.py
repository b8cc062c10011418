"""The Alertmanager example (deploy/prometheus/alertmanager.yml, issue 31): every severity the shipped Prometheus
rules use reaches its channel (critical pages, warning goes to Slack, both mail the team), no secret is inline,
and `amtool check-config` accepts it where amtool is installed."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from _binaries import required_binary

PROM = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
AM = yaml.safe_load((PROM / "alertmanager.yml").read_text())


def _matches(matcher: str, labels: dict[str, str]) -> bool:
    m = re.fullmatch(r'(\w+)\s*(=~|!=|=)\s*"(.*)"', matcher)
    assert m, f"matcher {matcher!r} is not of the form label=\"value\" / label=~\"regex\""
    name, op, value = m.groups()
    got = labels.get(name, "")
    return {"=": got == value, "!=": got != value, "=~": re.fullmatch(value, got) is not None}[op]


def receivers_for(labels: dict[str, str], route: dict | None = None) -> list[str]:
    """Alertmanager's routing: the first matching child (more with ``continue``), else the route itself."""
    route = route or AM["route"]
    out: list[str] = []
    for child in route.get("routes", []):
        if all(_matches(m, labels) for m in child.get("matchers", [])):
            out += receivers_for(labels, child)
            if not child.get("continue", False):
                break
    return out or [route["receiver"]]


def _rule_alerts() -> list[dict]:
    out = []
    for name in ("alerts.yml", "burn_rate.yml"):
        for group in yaml.safe_load((PROM / name).read_text())["groups"]:
            out += [r for r in group["rules"] if "alert" in r]
    return out


def test_every_shipped_alert_reaches_its_channel():
    alerts = _rule_alerts()
    assert alerts and {a["labels"]["severity"] for a in alerts} <= {"critical", "warning"}
    for a in alerts:
        got = receivers_for({"alertname": a["alert"], **a["labels"]})
        want = {"critical": ["oncall-pagerduty", "team-email"], "warning": ["team-slack", "team-email"]}
        assert got == want[a["labels"]["severity"]], (a["alert"], got)
    names = {r["name"] for r in AM["receivers"]}
    assert {AM["route"]["receiver"], *[r["receiver"] for r in AM["route"]["routes"]]} <= names


def test_no_secret_is_inline_and_a_fast_burn_silences_the_slow_one():
    text = (PROM / "alertmanager.yml").read_text()
    for key in ("routing_key", "service_key", "api_url", "smtp_auth_password", "auth_password"):
        assert not re.search(rf"^\s*-?\s*{key}:", text, re.M), key  # only the *_file forms
    burn = {a["alert"] for a in _rule_alerts() if "Burn_" in a["alert"]}
    rule = next(r for r in AM["inhibit_rules"] if "SafedlSLOSlowBurn" in str(r["target_matchers"]))
    for slow in (b for b in burn if "SlowBurn" in b):
        assert all(_matches(m, {"alertname": slow}) for m in rule["target_matchers"])
        assert all(_matches(m, {"alertname": slow.replace("Slow", "Fast")}) for m in rule["source_matchers"])


def _amtool() -> str:
    return required_binary("amtool", package="prometheus-alertmanager")


def test_amtool_checks_the_config():
    amtool = _amtool()
    res = subprocess.run([amtool, "check-config", str(PROM / "alertmanager.yml")], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    for labels, want in (({"severity": "critical"}, "oncall-pagerduty,team-email"),
                         ({"severity": "warning"}, "team-slack,team-email")):
        res = subprocess.run([amtool, "config", "routes", "test", f"--config.file={PROM / 'alertmanager.yml'}",
                              *[f"{k}={v}" for k, v in labels.items()]], capture_output=True, text=True, timeout=60)
        assert res.stdout.strip() == want == ",".join(receivers_for(labels)), res.stdout + res.stderr
