"""What a game day watches for: an alert of the security monitor (its JSONL sink) or the condition of a shipped
Prometheus rule (deploy/prometheus/alerts.yml) on the service's /metrics, or a recovery of the deployment.

Prometheus itself is not run: a ``prometheus`` expectation checks the rule's expression on scrapes taken every
poll (the rule's ``for:`` is not waited out), so its time is when the rule's condition first held."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

Samples = dict[tuple[str, tuple], float]


@dataclass(frozen=True)
class Expectation:
    """``alert`` should fire within ``target_s`` of the scenario's start; ``source``: monitor, prometheus or
    deployment; ``check(deployment, started_at, baseline)`` says whether it has."""

    alert: str
    source: str
    target_s: float
    check: Callable[[Any, float, Samples], bool]


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of ``name``'s samples whose labels include ``labels`` (a value may be a set of allowed values)."""
    out = 0.0
    for (n, labs), v in samples.items():
        d = dict(labs)
        if n == name and all(d.get(k) in (val if isinstance(val, (set, frozenset)) else {val})
                             for k, val in labels.items()):
            out += v
    return out


def monitor_alert(rule: str, target_s: float) -> Expectation:
    """The monitor's rule ``rule`` notified (state firing) after the scenario started."""
    def check(dep: Any, started: float, _: Samples) -> bool:
        return any(a.get("rule") == rule and a.get("state") == "firing" and float(a.get("started_at") or 0) >= started
                   for a in dep.alerts())
    return Expectation(f"monitor:{rule}", "monitor", target_s, check)


def counter_rose(alert: str, name: str, target_s: float, *, more_than: float = 0, **labels: Any) -> Expectation:
    """A Prometheus rule of the form ``increase(name{labels}[...]) > more_than``: the counter rose by more than
    that since the baseline."""
    def check(dep: Any, _: float, baseline: Samples) -> bool:
        return total(dep.scrape(), name, **labels) - total(baseline, name, **labels) > more_than
    return Expectation(alert, "prometheus", target_s, check)


def gauge_at_most(alert: str, name: str, limit: float, target_s: float, **labels: Any) -> Expectation:
    """A Prometheus rule of the form ``name{labels} <= limit`` on any series."""
    def check(dep: Any, _: float, __: Samples) -> bool:
        now = dep.scrape()
        return any(n == name and v <= limit and all(dict(labs).get(k) == val for k, val in labels.items())
                   for (n, labs), v in now.items())
    return Expectation(alert, "prometheus", target_s, check)
