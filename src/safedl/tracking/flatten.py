"""What a run's results.json gives a tracking server: flat parameters from the resolved profile, flat metrics from
every metric of the baseline, each attack and each defense, and the run's hashes as tags. Pure functions of
results.json (no MLflow import), so they are tested without it."""
from __future__ import annotations

import json
import re
from typing import Any

PARAM_VALUE_MAX = 6000  # MLflow's limit on a parameter value
_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_key(*parts: Any) -> str:
    """A metric or parameter name MLflow accepts (alphanumerics, _ - . space /)."""
    return _BAD.sub("_", ".".join(str(p) for p in parts if p not in (None, "")))


def flat_params(profile: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The resolved profile as dotted keys (lists by index); values as text, capped at MLflow's limit."""
    out: dict[str, str] = {}
    items = profile.items() if isinstance(profile, dict) else enumerate(profile)
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, (dict, list)) and v:
            out.update(flat_params(v, key))
        else:
            text = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
            out[metric_key(key)] = text[:PARAM_VALUE_MAX]
    return out


def metric_values(prefix: tuple, metrics: dict[str, Any]) -> dict[str, float]:
    """Each metric M = {value, ci95, n} under ``prefix`` as flat names (nested groups joined with dots)."""
    out: dict[str, float] = {}
    for name, m in (metrics or {}).items():
        if isinstance(m, dict) and "value" in m:
            if isinstance(m["value"], (int, float)) and m["value"] == m["value"]:  # not NaN
                out[metric_key(*prefix, name)] = float(m["value"])
            ci = m.get("ci95")
            if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(c, (int, float)) for c in ci):
                out[metric_key(*prefix, name, "ci95_lo")] = float(ci[0])
                out[metric_key(*prefix, name, "ci95_hi")] = float(ci[1])
            if isinstance(m.get("n"), int):
                out[metric_key(*prefix, name, "n")] = float(m["n"])
        elif isinstance(m, dict):
            out.update(metric_values((*prefix, name), m))
        elif isinstance(m, (int, float)) and not isinstance(m, bool) and m == m:
            out[metric_key(*prefix, name)] = float(m)
    return out


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Every metric of results.json: ``baseline.<m>``, ``attack.<id>.<m>``, ``defense.<id>.<against>.<m>`` (each
    with its 95% interval and n), ``<...>.time_s``, ``gate.passed`` (1 or 0)."""
    out = metric_values(("baseline",), results.get("baseline", {}).get("metrics", {}))
    for a in results.get("attacks", []):
        aid = a.get("id") or a.get("name")
        out.update(metric_values(("attack", aid), a.get("metrics", {})))
        if isinstance(a.get("time_s"), (int, float)):
            out[metric_key("attack", aid, "time_s")] = float(a["time_s"])
    for d in results.get("defenses", []):
        did = d.get("id") or d.get("name")
        out.update(metric_values(("defense", did, d.get("against")), d.get("metrics", {})))
        if isinstance(d.get("time_s"), (int, float)):
            out[metric_key("defense", did, d.get("against"), "time_s")] = float(d["time_s"])
    gate = results.get("gate") or {}
    if "passed" in gate:
        out["gate.passed"] = 1.0 if gate["passed"] else 0.0
    return out


def run_tags(results: dict[str, Any], bundles: dict[str, str]) -> dict[str, str]:
    """Tags: run id, versions, the data's content hashes, the gate outcome and each saved bundle's manifest sha256."""
    tags = {"safedl.run_id": str(results.get("run_id", "")),
            "safedl.version": str(results.get("environment", {}).get("safedl", "")),
            "safedl.seed": str(results.get("environment", {}).get("seed", ""))}
    for split, h in (results.get("data", {}).get("hashes") or {}).items():
        tags[metric_key("data.hash", split)] = str(h)
    gate = results.get("gate") or {}
    tags["gate.passed"] = str(bool(gate.get("passed"))).lower()
    tags["gate.failures"] = json.dumps(gate.get("failures", []), default=str)[:PARAM_VALUE_MAX]
    for name, digest in bundles.items():
        tags[metric_key("bundle.sha256", name)] = digest
    return tags
