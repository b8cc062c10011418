"""The release gate: pass/fail against the profile's thresholds, with every failure named."""
from __future__ import annotations

from typing import Any

from safedl.assess.risk import LEVELS
from safedl.profile import GateSpec


def _pick(metric: dict[str, Any] | None, use: str, *, higher_is_better: bool) -> float | None:
    if not isinstance(metric, dict) or metric.get("value") is None:
        return None
    ci = metric.get("ci95")
    if use == "value" or not ci:
        return float(metric["value"])
    if use == "lower":  # conservative: the worse end of the interval
        return float(ci[0] if higher_is_better else ci[1])
    return float(ci[1] if higher_is_better else ci[0])


def evaluate_gate(gate: GateSpec, results: dict[str, Any]) -> dict[str, Any]:
    failures: list[str] = []
    use = gate.use_interval

    def check(what: str, metric: dict | None, limit: float | None, *, minimum: bool) -> None:
        if limit is None:
            return
        v = _pick(metric, use, higher_is_better=minimum)
        if v is None:
            return
        if (minimum and v < limit) or (not minimum and v > limit):
            failures.append(f"{what} = {v:.4f} {'<' if minimum else '>'} {'min' if minimum else 'max'} {limit}")

    check("baseline clean_accuracy", results["baseline"]["metrics"].get("clean_accuracy"), gate.min_clean_accuracy,
          minimum=True)
    for a in results["attacks"]:
        if a["category"] == "evasion":
            check(f"{a['id']} robust_accuracy", a["metrics"].get("robust_accuracy"), gate.min_robust_accuracy, minimum=True)
        check(f"{a['id']} attack_success_rate", a["metrics"].get("attack_success_rate"), gate.max_attack_success_rate,
              minimum=False)
    for d in results["defenses"]:
        check(f"{d['id']} vs {d['against']} attack_success_rate_after", d["metrics"].get("attack_success_rate_after"),
              gate.max_attack_success_rate_after, minimum=False)
    if gate.max_risk is not None:
        lvl = results["risk"]["residual_level"] if results["defenses"] else results["risk"]["overall_level"]
        if LEVELS.index(lvl) > LEVELS.index(gate.max_risk):
            failures.append(f"risk level {lvl} > max_risk {gate.max_risk}")
    return {"passed": not failures, "failures": failures, "thresholds": gate.model_dump(), "compared": use}


def fail_on_failed_stages(gate: dict[str, Any], failed_stages: list[dict[str, Any]]) -> dict[str, Any]:
    """The gate result with one failure per stage that did not finish: an unmeasured stage never passes."""
    extra = [f"stage {f['stage']} failed after {f.get('attempts', 0)} attempt(s): {f.get('error')}"
             for f in failed_stages]
    return {**gate, "passed": gate["passed"] and not extra, "failures": list(gate["failures"]) + extra}
