"""Models at or near chance: a model whose clean accuracy is no better than guessing is flagged, never ranked.

Rule: a model is *at chance* when the upper end of the 95% interval of its clean accuracy is below ``1.5 / K``
for K classes (``CHANCE_FACTOR``), i.e. even the most favourable reading of the measurement is within half a
chance-level of guessing one class. The subjects are the baseline (``baseline.metrics.clean_accuracy``) and every
defended model (``clean_accuracy`` of an evasion defense, ``clean_accuracy_after`` of a poisoning/backdoor or
extraction defense). A defense whose model is at chance can report a "lower" attack success only because it
predicts nothing; the report, ``safedl recommend`` and the release gate flag it (the gate fails it, configured or
not, as it fails a stage that did not finish).
"""
from __future__ import annotations

from typing import Any, Optional

CHANCE_FACTOR = 1.5
CLEAN_KEYS = ("clean_accuracy", "clean_accuracy_after")


def chance_limit(num_classes: int) -> float:
    """``1.5 / K``: an upper 95% bound of clean accuracy below this is at chance."""
    return CHANCE_FACTOR / max(1, int(num_classes))


def _upper(m: Any) -> Optional[float]:
    if not isinstance(m, dict) or m.get("value") is None:
        return None
    ci = m.get("ci95")
    return float(ci[1]) if ci and ci[1] is not None else float(m["value"])


def clean_metric(metrics: dict[str, Any]) -> Optional[tuple[str, dict[str, Any]]]:
    """(name, metric) of the defended model's clean accuracy in a defense entry's metrics, or None."""
    for key in CLEAN_KEYS:
        if isinstance(metrics.get(key), dict) and metrics[key].get("value") is not None:
            return key, metrics[key]
    return None


def at_chance(metric: Any, *, num_classes: int) -> bool:
    """True when the metric's upper 95% bound (its value without an interval) is below ``1.5 / K``."""
    up = _upper(metric)
    return up is not None and up < chance_limit(num_classes)


def _flag(subject: str, key: str, m: dict[str, Any], k: int) -> dict[str, Any]:
    up = _upper(m)
    return {"subject": subject, "metric": key, "value": float(m["value"]), "upper95": up, "limit": chance_limit(k),
            "reason": f"{key} = {float(m['value']):.3f} (upper 95% bound {up:.3f}, n={m.get('n')}) is below "
                      f"1.5/K = {chance_limit(k):.3f} for K={k} classes: the model is at chance"}


def chance_flags(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One flag per model of the run at chance: the baseline and every defended model (see the module rule)."""
    k = int((results.get("data") or {}).get("num_classes") or 0)
    if k < 2:
        return []
    out = []
    base = (results.get("baseline") or {}).get("metrics", {}).get("clean_accuracy")
    if at_chance(base, num_classes=k):
        out.append(_flag("baseline", "clean_accuracy", base, k))
    for d in results.get("defenses", []):
        got = clean_metric(d.get("metrics", {}))
        if got is not None and at_chance(got[1], num_classes=k):
            out.append(_flag(f"{d['id']} vs {d['against']}", got[0], got[1], k))
    return out


def fail_on_chance(gate: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """The gate result with one failed check per model at chance (a collapsed model never passes)."""
    checks = [{"name": f"not_at_chance: {f['subject']}", "metric": f"{f['subject']}.{f['metric']}", "op": ">=",
               "threshold": f["limit"], "value": f["upper95"], "bound": "upper95", "passed": False,
               "reason": f["reason"]} for f in chance_flags(results)]
    return {**gate, "passed": gate["passed"] and not checks, "checks": list(gate.get("checks", [])) + checks,
            "failures": list(gate["failures"]) + [f"{c['name']}: {c['reason']}" for c in checks]}
