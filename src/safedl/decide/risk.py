"""Risk rating: likelihood (what the threat model lets an attacker do) x impact (measured success x sensitivity).

The rule is deliberately simple so a reader can recompute every rating from results.json (docs/risk.md justifies
every weight):

- ``score = likelihood x impact``, ``impact = q x sensitivity weight``;
- ``q`` is ONE measured quantity per attack, the conservative (upper) end of its 95% interval, chosen by
  :func:`quantity` from the attack's category and metrics; the residual risk after a defense uses exactly the same
  quantity measured on the defended system, with the same bound, on the same test images;
- levels: < 0.1 low, < 0.3 medium, < 0.6 high, else critical;
- the residual score of an attack is the lowest over the defenses evaluated against it that measured the same
  quantity, and never above the score without defense (a defense that makes things worse is not deployed).

Each row names the quantity and the measured numbers that drive it (``driver``), so the report can say which
measured number produced each rating.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from safedl.profile import ThreatModel

LEVELS = ("low", "medium", "high", "critical")
RULE = ("score = likelihood x impact; impact = q x data-sensitivity weight, where q is one measured quantity per "
        "attack at the upper end of its 95% interval (evasion: 1 - robust_accuracy; backdoor/poisoning: "
        "attack_success_rate or targeted_success_rate, else the clean-accuracy drop); residual risk uses the same q "
        "measured on the defended system, the lowest over the evaluated defenses and never above the undefended "
        "score; levels: <0.1 low, <0.3 medium, <0.6 high, else critical")

# Weights: docs/risk.md explains each value and the threat-model answer it comes from.
SENSITIVITY = {"low": 0.5, "medium": 0.75, "high": 1.0}
ACCESS = {"white-box": 1.0, "gray-box": 0.6, "black-box": 0.3}
DATA_SOURCE = {"trusted": 0.1, "curated": 0.3, "third_party": 0.6, "crowdsourced": 0.8, "scraped": 1.0}
TRANSFER = {"exposed": 0.8, "not exposed": 0.5}


def level(score: float) -> str:
    return "low" if score < 0.1 else "medium" if score < 0.3 else "high" if score < 0.6 else "critical"


def likelihood(tm: ThreatModel, category: str, access: str) -> float:
    """How reachable an attack is under the threat model (0-1)."""
    if category in ("poisoning", "backdoor"):
        return DATA_SOURCE[tm.training_data_source]
    if access == "white-box":
        return ACCESS[tm.model_access]
    if access == "transfer":
        return TRANSFER["exposed" if tm.interface_exposed != "none" else "not exposed"]
    if access == "scores":
        return 1.0 if tm.interface_exposed == "scores" else 0.0
    if access == "labels":
        return 1.0 if tm.interface_exposed in ("scores", "labels") else 0.0
    return 1.0


# ---------------------------------------------------------------------------------------------- the quantity

def _metric(metrics: dict[str, Any], name: str) -> Optional[dict[str, Any]]:
    m = metrics.get(name)
    return m if isinstance(m, dict) and m.get("value") is not None else None


def _upper(m: dict[str, Any]) -> float:
    ci = m.get("ci95")
    return float(ci[1]) if ci else float(m["value"])


def _lower(m: dict[str, Any]) -> float:
    ci = m.get("ci95")
    return float(ci[0]) if ci else float(m["value"])


@dataclass(frozen=True)
class Quantity:
    """One measured success quantity: how to read (point, upper, lower 95% bound) from an attack and a defense entry."""

    name: str
    before: Callable[[dict[str, Any], Optional[float]], Optional[tuple[float, float, float]]]
    after: Callable[[dict[str, Any], Optional[float]], Optional[tuple[float, float, float]]]


def _rate(*names: str) -> Callable[[dict[str, Any], Optional[float]], Optional[tuple[float, float, float]]]:
    """The first of ``names`` present (aliases of one quantity on the same inputs)."""
    def read(metrics: dict[str, Any], _base: Optional[float]) -> Optional[tuple[float, float, float]]:
        for name in names:
            m = _metric(metrics, name)
            if m is not None:
                return float(m["value"]), _upper(m), _lower(m)
        return None
    return read


def _robust_error(metrics: dict[str, Any], _base: Optional[float]) -> Optional[tuple[float, float, float]]:
    m = _metric(metrics, "robust_accuracy")
    return None if m is None else (1.0 - float(m["value"]), 1.0 - _lower(m), 1.0 - _upper(m))


def _drop(name: str) -> Callable[[dict[str, Any], Optional[float]], Optional[tuple[float, float, float]]]:
    def read(metrics: dict[str, Any], base: Optional[float]) -> Optional[tuple[float, float, float]]:
        m = _metric(metrics, name)
        if m is None or base is None:
            return None
        return max(0.0, base - float(m["value"])), max(0.0, base - _lower(m)), max(0.0, base - _upper(m))
    return read


QUANTITIES = {
    "robust_error": Quantity("1 - robust_accuracy", _robust_error, _robust_error),
    "attack_success_rate": Quantity("attack_success_rate", _rate("attack_success_rate"),
                                    _rate("attack_success_rate_after")),
    "targeted_success_rate": Quantity("targeted_success_rate", _rate("targeted_success_rate"),
                                      # poisoning defenses report it as attack_success_rate_after, measured on the
                                      # same aimed inputs (attack_poisoning: test_triggered_x)
                                      _rate("targeted_success_rate_after", "attack_success_rate_after")),
    "clean_accuracy_drop": Quantity("clean-accuracy drop (baseline - clean_accuracy)", _drop("clean_accuracy"),
                                    _drop("clean_accuracy_after")),
}


def quantity(attack: dict[str, Any]) -> str:
    """The key of the one quantity that rates an attack: the first it measured, in the documented order."""
    m = attack.get("metrics", {})
    order = ("robust_error", "attack_success_rate") if attack.get("category") == "evasion" else (
        "attack_success_rate", "targeted_success_rate", "clean_accuracy_drop")
    for key in order:
        if QUANTITIES[key].before(m, 0.0) is not None:
            return key
    return order[-1]


def _baseline_of(attack: dict[str, Any], baseline_accuracy: Optional[float]) -> Optional[float]:
    b = attack.get("metrics", {}).get("baseline", {})
    if isinstance(b, dict) and isinstance(b.get("clean_accuracy"), dict):
        return float(b["clean_accuracy"]["value"])
    return baseline_accuracy


def attack_impact(attack: dict[str, Any], *, baseline_accuracy: Optional[float] = None) -> float:
    """The attack's rating quantity (upper 95% bound), before any defense."""
    got = QUANTITIES[quantity(attack)].before(attack.get("metrics", {}), _baseline_of(attack, baseline_accuracy))
    return got[1] if got else 0.0


def defended_success(defense: dict[str, Any], attack: dict[str, Any], *,
                     baseline_accuracy: Optional[float] = None) -> Optional[tuple[float, float, float]]:
    """(point, upper, lower 95% bound) of the attack's own quantity on the defended system, or None."""
    return QUANTITIES[quantity(attack)].after(defense.get("metrics", {}), _baseline_of(attack, baseline_accuracy))


# ---------------------------------------------------------------------------------------------- the table

def _row(tm: ThreatModel, a: dict[str, Any], defenses: list[dict[str, Any]], weight: float,
         baseline_accuracy: Optional[float]) -> dict[str, Any]:
    key = quantity(a)
    q = QUANTITIES[key]
    base = _baseline_of(a, baseline_accuracy)
    got = q.before(a.get("metrics", {}), base)
    value, upper = (got[0], got[1]) if got else (0.0, 0.0)
    lk = likelihood(tm, a["category"], a.get("access", "white-box"))
    score = lk * upper * weight
    row: dict[str, Any] = {
        "attack": a["id"], "category": a["category"], "likelihood": lk, "sensitivity_weight": weight,
        "quantity": q.name, "q_value": value, "q_upper": upper, "impact": upper * weight,
        "score": score, "level": level(score),
        "driver": f"{q.name} = {value:.4f} (upper 95% bound {upper:.4f})" if got else f"{q.name}: not measured",
    }
    best, skipped = None, []
    for d in defenses:
        if d.get("against") != a["id"]:
            continue
        after = q.after(d.get("metrics", {}), base)
        if after is None:
            skipped.append(d["id"])
        elif best is None or after[1] < best[1][1]:
            best = (d["id"], after)
    if skipped:
        row["not_comparable"] = skipped
        row["not_comparable_reason"] = f"did not measure {q.name} on the defended system"
    if best is not None:
        did, (v_after, u_after, _) = best
        row["best_defense"] = did
        row["residual_q_value"], row["residual_q_upper"] = v_after, u_after
        row["residual_score"] = min(score, lk * u_after * weight)
        row["residual_level"] = level(row["residual_score"])
        row["residual_driver"] = f"{q.name} with {did} = {v_after:.4f} (upper 95% bound {u_after:.4f})"
        if lk * u_after * weight > score:
            row["residual_driver"] += "; no evaluated defense lowered it, so the residual is the undefended score"
    return row


def assess_risk(tm: ThreatModel, attacks: list[dict[str, Any]], defenses: list[dict[str, Any]], *,
                baseline_accuracy: float | None = None) -> dict[str, Any]:
    """The risk table of a run (see the module docstring for the rule)."""
    weight = SENSITIVITY[tm.data_sensitivity]
    rows = [_row(tm, a, defenses, weight, baseline_accuracy) for a in attacks]
    overall = max((r["score"] for r in rows), default=0.0)
    residual = max((r.get("residual_score", r["score"]) for r in rows), default=0.0)
    drivers = {"overall": max(rows, key=lambda r: r["score"])["attack"] if rows else None,
               "residual": max(rows, key=lambda r: r.get("residual_score", r["score"]))["attack"] if rows else None}
    return {"rule": RULE, "weights": {"sensitivity": SENSITIVITY, "model_access": ACCESS,
                                      "training_data_source": DATA_SOURCE, "transfer": TRANSFER},
            "per_attack": rows, "driven_by": drivers,
            "overall_score": overall, "overall_level": level(overall),
            "residual_score": residual, "residual_level": level(residual)}
