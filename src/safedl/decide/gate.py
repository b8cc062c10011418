"""The release gate: pass/fail against the profile's thresholds, every check stated, every failure named.

Result (``results["gate"]``)::

    {"passed": bool, "configured": bool, "compared": "value" | "lower" | "upper", "thresholds": {...set ones...},
     "checks": [{"name", "metric", "op": ">=" | "<=", "threshold", "value": float | None,
                 "bound": "point" | "lower95" | "upper95", "passed", "reason"}],
     "failures": [str]}

Rules: a threshold is checked on every subject it names (the baseline, every attack, every defense of the kind);
a subject that lacks the metric fails its check, and a threshold that applies to nothing in the run (e.g.
``min_robust_accuracy`` without an evasion attack) is one failed check saying so, never a silent pass. With no
threshold set the gate is not configured: ``passed`` stays True for old readers, ``configured`` is False, and the
CLI's ``--require-gate`` turns that into an error.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from safedl.decide.risk import LEVELS
from safedl.profile import GateSpec

Check = dict[str, Any]


def _bound(use: str, *, minimum: bool) -> str:
    """Which end of the 95% interval is compared: 'lower' = conservative (lower for minimums, upper for maximums)."""
    if use == "value":
        return "point"
    conservative = use == "lower"
    return "lower95" if conservative == minimum else "upper95"


def _pick(metric: Any, bound: str) -> tuple[float | None, str]:
    """(value, bound actually used): the point value when the metric has no interval."""
    if not isinstance(metric, dict) or metric.get("value") is None:
        return None, bound
    ci = metric.get("ci95")
    if bound == "point" or not ci or ci[0] is None:
        return float(metric["value"]), "point"
    return float(ci[0] if bound == "lower95" else ci[1]), bound


def _get(metrics: dict[str, Any], path: str) -> Any:
    cur: Any = metrics
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return cur


def _check(name: str, metric: str, op: str, threshold: float, value: float | None, bound: str,
           missing: str = "") -> Check:
    if value is None:
        return {"name": name, "metric": metric, "op": op, "threshold": float(threshold), "value": None,
                "bound": bound, "passed": False, "reason": missing or f"{metric} is missing from the results"}
    ok = value >= threshold if op == ">=" else value <= threshold
    where = "" if bound == "point" else f" ({bound.replace('95', ' 95% bound')})"
    rel = op if ok else ("<" if op == ">=" else ">")
    return {"name": name, "metric": metric, "op": op, "threshold": float(threshold), "value": float(value),
            "bound": bound, "passed": ok, "reason": f"{metric}{where} = {value:.4f} {rel} {threshold:g}"}


def _per_subject(key: str, limit: float | None, subjects: Iterable[tuple[str, dict]], path: str | Callable,
                 *, minimum: bool, use: str, nothing: str) -> list[Check]:
    """One check per subject (label, metrics); one failed check when there is no subject."""
    if limit is None:
        return []
    op, bound = (">=" if minimum else "<="), _bound(use, minimum=minimum)
    out = []
    for label, metrics in subjects:
        p = path(metrics) if callable(path) else path
        value, used = _pick(_get(metrics, p), bound)
        out.append(_check(f"{key}: {label}", f"{label}.{p}", op, limit, value, used))
    if not out:
        out.append(_check(key, "(none)", op, limit, None, bound, f"applies to nothing in this run: {nothing}"))
    return out


def _success_path(metrics: dict) -> str:
    return "attack_success_rate" if "attack_success_rate" in metrics or "targeted_success_rate" not in metrics \
        else "targeted_success_rate"


def _recall_path(metrics: dict) -> str:
    return "detection_adaptive.tpr" if _get(metrics, "detection_adaptive.tpr") is not None else "detection.tpr"


def _drop_checks(limit: float | None, evasion_defenses: list[tuple[str, dict]]) -> list[Check]:
    if limit is None:
        return []
    out = []
    for label, m in evasion_defenses:
        before, after = _get(m, "clean_accuracy_undefended.value"), _get(m, "clean_accuracy.value")
        value = None if before is None or after is None else float(before) - float(after)
        out.append(_check(f"max_clean_accuracy_drop: {label}", f"{label}.clean_accuracy_drop", "<=", limit, value,
                          "point", f"{label}: clean_accuracy or clean_accuracy_undefended missing"))
    return out or [_check("max_clean_accuracy_drop", "(none)", "<=", limit, None, "point",
                          "applies to nothing in this run: no evasion defense")]


def _canary_checks(limit: int | None, results: dict[str, Any]) -> list[Check]:
    """``max_canary_changes``: count of canary records changed from the baseline's prediction, on every poisoning
    defense's model (the model a release would ship) or, with no such defense, every attack's poisoned model."""
    if limit is None:
        return []
    defended = [(f"{d['id']} vs {d['against']}", d["metrics"]) for d in results.get("defenses", [])
                if "attack_success_rate_after" in d["metrics"] or "clean_accuracy_after" in d["metrics"]]
    subjects = defended or [(a["id"], a["metrics"]) for a in results.get("attacks", [])
                            if a.get("category") in ("poisoning", "backdoor")]
    out = []
    for label, m in subjects:
        c = m.get("canary_changes")
        value = None if not isinstance(c, dict) or c.get("value") is None else float(round(c["value"] * c["n"]))
        chk = _check(f"max_canary_changes: {label}", f"{label}.canary_changes", "<=", float(limit), value, "point",
                     f"{label}: no canary_changes (set canary_records.source to holdout or path)")
        if value is not None:
            chk["reason"] = f"{int(value)} of {c['n']} canary records changed prediction " \
                            f"{'<=' if chk['passed'] else '>'} {limit}"
        out.append(chk)
    return out or [_check("max_canary_changes", "(none)", "<=", float(limit), None, "point",
                          "applies to nothing in this run: no poisoning or backdoor attack")]


def _risk_check(gate: GateSpec, results: dict[str, Any]) -> list[Check]:
    if gate.max_risk is None:
        return []
    risk = results.get("risk") or {}
    which = "residual_level" if results.get("defenses") else "overall_level"
    lvl = risk.get(which)
    value = float(LEVELS.index(lvl)) if lvl in LEVELS else None
    chk = _check("max_risk", f"risk.{which}", "<=", float(LEVELS.index(gate.max_risk)), value, "point",
                 f"risk.{which} is missing from the results")
    if value is not None:
        chk["reason"] = f"risk.{which} = {lvl} {'<=' if chk['passed'] else '>'} max_risk {gate.max_risk}"
    return [chk]


def evaluate_gate(gate: GateSpec, results: dict[str, Any]) -> dict[str, Any]:
    """Check every set threshold of ``gate`` against ``results`` (the results.json mapping)."""
    use = gate.use_interval
    attacks = [(a["id"], a["metrics"]) for a in results.get("attacks", [])]
    evasion = [(a["id"], a["metrics"]) for a in results.get("attacks", []) if a.get("category") == "evasion"]
    defenses = [(f"{d['id']} vs {d['against']}", d["metrics"]) for d in results.get("defenses", [])]
    ev_def = [(lbl, m) for lbl, m in defenses if "robust_accuracy" in m]
    detectors = [(lbl, m) for lbl, m in defenses if "detection" in m and "robust_accuracy" in m]
    poison_def = [(lbl, m) for lbl, m in defenses if "attack_success_rate_after" in m]
    checks: list[Check] = []
    checks += _per_subject("min_clean_accuracy", gate.min_clean_accuracy, [("baseline", results["baseline"]["metrics"])],
                           "clean_accuracy", minimum=True, use=use, nothing="no baseline")
    checks += _per_subject("min_robust_accuracy", gate.min_robust_accuracy, evasion, "robust_accuracy", minimum=True,
                           use=use, nothing="no evasion attack")
    checks += _per_subject("max_attack_success_rate", gate.max_attack_success_rate, attacks, _success_path,
                           minimum=False, use=use, nothing="no attack")
    checks += _per_subject("max_attack_success_rate_after", gate.max_attack_success_rate_after, poison_def,
                           "attack_success_rate_after", minimum=False, use=use,
                           nothing="no defense that measures attack_success_rate_after (poisoning/backdoor defenses)")
    checks += _per_subject("min_adaptive_robust_accuracy", gate.min_adaptive_robust_accuracy, ev_def,
                           "robust_accuracy", minimum=True, use=use, nothing="no evasion defense")
    checks += _drop_checks(gate.max_clean_accuracy_drop, ev_def)
    checks += _per_subject("min_detection_recall", gate.min_detection_recall, detectors, _recall_path, minimum=True,
                           use=use, nothing="no evasion defense with a detector")
    checks += _canary_checks(gate.max_canary_changes, results)
    checks += _risk_check(gate, results)
    failures = [f"{c['name']}: {c['reason']}" for c in checks if not c["passed"]]
    return {"passed": not failures, "configured": bool(gate.thresholds()), "checks": checks, "failures": failures,
            "thresholds": gate.thresholds(), "compared": use}


def gate_summary(gate: dict[str, Any]) -> str:
    """One sentence saying what the gate checked and whether it passed (for the report header and the CLI)."""
    if not gate.get("configured", True) and not gate.get("checks"):
        return "Release gate: not configured (no thresholds in evaluation.gate), so nothing was checked."
    checks = gate.get("checks") or []
    names = sorted({c["name"].split(":")[0] for c in checks}) or sorted(gate.get("thresholds", {}))
    bounds = sorted({c["bound"] for c in checks if c.get("value") is not None}) or ["point"]
    how = " and ".join("point estimates" if b == "point" else f"{b.replace('95', '')} 95% bounds" for b in bounds)
    n_fail = sum(not c["passed"] for c in checks)
    verdict = "PASSED" if gate.get("passed") else f"FAILED ({n_fail} of {len(checks)} checks)"
    return (f"Release gate {verdict}: {len(checks)} check(s) of {', '.join(names)} on {how}"
            " (the gate tests only these thresholds; the risk level is a separate rating unless max_risk is set).")


def fail_on_failed_stages(gate: dict[str, Any], failed_stages: list[dict[str, Any]]) -> dict[str, Any]:
    """The gate result with one failed check per stage that did not finish: an unmeasured stage never passes."""
    checks = [{"name": f"stage {f['stage']}", "metric": "stage finished", "op": ">=", "threshold": 1.0, "value": None,
               "bound": "point", "passed": False,
               "reason": f"failed after {f.get('attempts', 0)} attempt(s): {f.get('error')}"} for f in failed_stages]
    return {**gate, "passed": gate["passed"] and not checks, "checks": list(gate.get("checks", [])) + checks,
            "failures": list(gate["failures"]) + [f"{c['name']}: {c['reason']}" for c in checks]}
