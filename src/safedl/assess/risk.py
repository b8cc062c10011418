"""Risk rating: likelihood (what the threat model lets an attacker do) x impact (measured success, data sensitivity).

The rule is deliberately simple and documented so a reader can recompute every rating from results.json:
score = likelihood * impact, impact = attack success (upper end of its 95% interval; the clean-accuracy drop for
availability poisoning) * sensitivity weight;
levels: < 0.1 low, < 0.3 medium, < 0.6 high, else critical. Residual risk uses the best defense's measured
success after defense in place of the attack's own.
"""
from __future__ import annotations

from typing import Any

from safedl.profile import ThreatModel

LEVELS = ("low", "medium", "high", "critical")
RULE = ("score = likelihood x impact; impact = attack success (upper 95% bound; the clean-accuracy drop for "
        "availability poisoning) x data-sensitivity weight; "
        "levels: <0.1 low, <0.3 medium, <0.6 high, else critical; residual uses the best defense's success after")
_SENSITIVITY = {"low": 0.5, "medium": 0.75, "high": 1.0}
_ACCESS = {"white-box": 1.0, "gray-box": 0.6, "black-box": 0.3}
_DATA_SOURCE = {"trusted": 0.1, "curated": 0.3, "third_party": 0.6, "crowdsourced": 0.8, "scraped": 1.0}


def level(score: float) -> str:
    return "low" if score < 0.1 else "medium" if score < 0.3 else "high" if score < 0.6 else "critical"


def likelihood(tm: ThreatModel, category: str, access: str) -> float:
    """How reachable an attack is under the threat model (0-1)."""
    if category in ("poisoning", "backdoor"):
        return _DATA_SOURCE[tm.training_data_source]
    if access == "white-box":
        return _ACCESS[tm.model_access]
    if access == "transfer":
        return 0.8 if tm.interface_exposed != "none" else 0.5
    if access == "scores":
        return 1.0 if tm.interface_exposed == "scores" else 0.0
    if access == "labels":
        return 1.0 if tm.interface_exposed in ("scores", "labels") else 0.0
    return 1.0


def _success(metrics: dict[str, Any], *names: str) -> float | None:
    for name in names:
        m = metrics.get(name)
        if isinstance(m, dict) and m.get("value") is not None:
            ci = m.get("ci95")
            return float(ci[1]) if ci else float(m["value"])
    return None


def attack_impact(attack: dict[str, Any]) -> float:
    """Attack success (upper 95% bound); for availability poisoning without a success rate, the accuracy drop."""
    m = attack.get("metrics", {})
    s = _success(m, "attack_success_rate")
    if s is None and isinstance(m.get("clean_accuracy_drop"), dict):
        s = max(0.0, float(m["clean_accuracy_drop"]["value"]))
    return s or 0.0


def defended_success(defense: dict[str, Any], *, baseline_accuracy: float | None = None) -> float | None:
    """An attack's success against a defended system (upper 95% bound), from a defense entry."""
    m = defense.get("metrics", {})
    s = _success(m, "attack_success_rate_after", "attack_success_rate")
    if s is None and baseline_accuracy is not None and isinstance(m.get("clean_accuracy_after"), dict):
        s = max(0.0, baseline_accuracy - float(m["clean_accuracy_after"]["value"]))
    if s is None and isinstance(m.get("robust_accuracy"), dict) and isinstance(m.get("clean_accuracy"), dict):
        ra, ca = m["robust_accuracy"], m["clean_accuracy"]
        if ca["value"]:
            s = max(0.0, 1.0 - float(ra["value"]) / float(ca["value"]))
    return s


def assess_risk(tm: ThreatModel, attacks: list[dict[str, Any]], defenses: list[dict[str, Any]], *,
                baseline_accuracy: float | None = None) -> dict[str, Any]:
    weight = _SENSITIVITY[tm.data_sensitivity]
    rows = []
    for a in attacks:
        success = attack_impact(a)
        lk = likelihood(tm, a["category"], a.get("access", "white-box"))
        score = lk * success * weight
        row = {"attack": a["id"], "category": a["category"], "likelihood": lk, "impact": success * weight,
               "score": score, "level": level(score)}
        best = None
        for d in defenses:
            if d.get("against") != a["id"]:
                continue
            s = defended_success(d, baseline_accuracy=baseline_accuracy if "attack_success_rate" not in a.get("metrics", {})
                                 else None)
            if s is not None and (best is None or s < best[1]):
                best = (d["id"], s)
        if best is not None:
            row["best_defense"] = best[0]
            row["residual_score"] = lk * best[1] * weight
            row["residual_level"] = level(row["residual_score"])
        rows.append(row)
    overall = max((r["score"] for r in rows), default=0.0)
    residual = max((r.get("residual_score", r["score"]) for r in rows), default=0.0)
    return {"rule": RULE, "per_attack": rows,
            "overall_score": overall, "overall_level": level(overall),
            "residual_score": residual, "residual_level": level(residual)}
