"""Risk rating and release gate computed from results entries."""
from __future__ import annotations

from safedl.decide.gate import evaluate_gate
from safedl.decide.risk import assess_risk, level
from safedl.profile import GateSpec, ThreatModel
from safedl.utils.stats import proportion


def _attack(aid, cat, access, k, n, **extra):
    return {"id": aid, "category": cat, "access": access, "metrics": {"attack_success_rate": proportion(k, n), **extra}}


def test_levels_and_threat_model_likelihood():
    assert [level(s) for s in (0.05, 0.2, 0.5, 0.9)] == ["low", "medium", "high", "critical"]
    attacks = [_attack("pgd", "evasion", "white-box", 90, 100), _attack("sq", "evasion", "scores", 90, 100)]
    white = assess_risk(ThreatModel(model_access="white-box"), attacks, [])
    black = assess_risk(ThreatModel(model_access="black-box", interface_exposed="labels"), attacks, [])
    w, b = {r["attack"]: r for r in white["per_attack"]}, {r["attack"]: r for r in black["per_attack"]}
    assert w["pgd"]["score"] > b["pgd"]["score"]
    assert b["sq"]["score"] == 0.0  # a score-based attack cannot run when only labels are exposed
    assert white["overall_level"] == "critical"


def test_residual_risk_uses_best_defense_and_accuracy_drop_for_availability():
    attacks = [_attack("bd", "backdoor", "", 95, 100),
               {"id": "flip", "category": "poisoning",
                "metrics": {"clean_accuracy": proportion(57, 100), "baseline": {"clean_accuracy": proportion(97, 100)}}}]
    defenses = [{"id": "ss", "against": "bd", "metrics": {"attack_success_rate_after": proportion(2, 100)}},
                {"id": "weak", "against": "bd", "metrics": {"attack_success_rate_after": proportion(60, 100)}},
                {"id": "dc", "against": "flip", "metrics": {"clean_accuracy_after": proportion(95, 100)}}]
    tm = ThreatModel(training_data_source="scraped", data_sensitivity="high")
    risk = assess_risk(tm, attacks, defenses, baseline_accuracy=0.97)
    rows = {r["attack"]: r for r in risk["per_attack"]}
    assert rows["bd"]["best_defense"] == "ss" and rows["bd"]["residual_level"] == "low"
    lo = proportion(57, 100)["ci95"][0]
    assert abs(rows["flip"]["impact"] - (0.97 - lo)) < 1e-9 and rows["flip"]["level"] == "high"
    assert rows["flip"]["residual_score"] < 0.1
    assert risk["residual_level"] == "low" and risk["overall_level"] == "critical"


def test_gate_names_each_failure_and_can_use_the_conservative_bound():
    results = {"baseline": {"metrics": {"clean_accuracy": proportion(96, 100)}},
               "attacks": [_attack("pgd", "evasion", "white-box", 50, 100, robust_accuracy=proportion(45, 100))],
               "defenses": [], "risk": {"overall_level": "high", "residual_level": "high"}}
    g = evaluate_gate(GateSpec(min_clean_accuracy=0.95, min_robust_accuracy=0.4, max_risk="medium"), results)
    assert not g["passed"] and len(g["failures"]) == 1 and "risk" in g["failures"][0]
    g = evaluate_gate(GateSpec(min_clean_accuracy=0.95, min_robust_accuracy=0.4, use_interval="lower"), results)
    assert not g["passed"] and any("clean_accuracy" in f for f in g["failures"]) and any("pgd" in f for f in g["failures"])
    assert evaluate_gate(GateSpec(), results)["passed"]
