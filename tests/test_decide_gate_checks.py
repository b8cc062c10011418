"""Release gate: every check stated, thresholds that apply to nothing fail, no-threshold gates are 'not configured',
and profiles that assess nothing are refused."""
from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from safedl.decide.gate import evaluate_gate, gate_summary
from safedl.cli import app
from safedl.errors import ProfileError
from safedl.profile import GateSpec, parse_profile
from safedl.utils.stats import proportion

CHECK_KEYS = {"name", "metric", "op", "threshold", "value", "bound", "passed", "reason"}


def _results(*, attacks=(), defenses=(), clean=(41, 100)):
    return {"baseline": {"metrics": {"clean_accuracy": proportion(*clean)}}, "attacks": list(attacks),
            "defenses": list(defenses), "risk": {"overall_level": "critical", "residual_level": "high"}}


def _evasion_defense(*, clean, undefended, robust, tpr=None):
    m = {"clean_accuracy": proportion(*clean), "clean_accuracy_undefended": proportion(*undefended),
         "robust_accuracy": proportion(*robust)}
    if tpr is not None:
        m["detection"] = {"tpr": proportion(*tpr)}
        m["detection_adaptive"] = {"tpr": proportion(tpr[0] // 2, tpr[1])}
    return {"id": "fs", "against": "pgd", "metrics": m}


def test_no_threshold_is_not_configured_and_checks_nothing():
    g = evaluate_gate(GateSpec(), _results())  # a 0.41-accuracy model
    assert g["configured"] is False and g["checks"] == [] and g["failures"] == []
    assert g["passed"] is True  # old readers keep working; the CLI says NOT CONFIGURED and --require-gate refuses it
    assert "not configured" in gate_summary(g)


def test_threshold_that_applies_to_nothing_fails_with_its_reason():
    g = evaluate_gate(GateSpec(min_clean_accuracy=0.3, min_robust_accuracy=0.5, max_attack_success_rate_after=0.1),
                      _results())
    assert g["configured"] and not g["passed"]
    by = {c["name"]: c for c in g["checks"]}
    assert by["min_clean_accuracy: baseline"]["passed"]
    for key in ("min_robust_accuracy", "max_attack_success_rate_after"):
        c = by[key]
        assert set(c) == CHECK_KEYS and c["value"] is None and not c["passed"]
        assert "applies to nothing" in c["reason"]
    assert len(g["failures"]) == 2


def test_each_check_has_the_documented_fields_and_bound():
    pgd = {"id": "pgd", "category": "evasion", "metrics": {"robust_accuracy": proportion(45, 100),
                                                           "attack_success_rate": proportion(50, 100)}}
    g = evaluate_gate(GateSpec(min_clean_accuracy=0.4, min_robust_accuracy=0.4, max_attack_success_rate=0.6,
                               use_interval="lower"), _results(attacks=[pgd]))
    for c in g["checks"]:
        assert set(c) == CHECK_KEYS and c["op"] in (">=", "<=") and isinstance(c["threshold"], float)
    by = {c["name"]: c for c in g["checks"]}
    # conservative: lower 95% bound for minimums, upper for maximums
    assert by["min_robust_accuracy: pgd"]["bound"] == "lower95"
    assert by["min_robust_accuracy: pgd"]["value"] == pytest.approx(proportion(45, 100)["ci95"][0])
    assert by["max_attack_success_rate: pgd"]["bound"] == "upper95"
    assert not by["min_robust_accuracy: pgd"]["passed"]  # 0.45 point, but its lower bound is below 0.4
    assert not by["min_clean_accuracy: baseline"]["passed"]  # 0.41 point, lower bound below 0.4


def test_evasion_defense_thresholds():
    strong = _evasion_defense(clean=(95, 100), undefended=(97, 100), robust=(60, 100), tpr=(80, 100))
    gate = GateSpec(min_adaptive_robust_accuracy=0.5, max_clean_accuracy_drop=0.05, min_detection_recall=0.3)
    g = evaluate_gate(gate, _results(defenses=[strong]))
    assert g["passed"], g["failures"]
    by = {c["name"].split(":")[0]: c for c in g["checks"]}
    assert by["max_clean_accuracy_drop"]["value"] == pytest.approx(0.02)
    assert by["min_detection_recall"]["metric"].endswith("detection_adaptive.tpr")  # the adaptive attack's recall
    weak = _evasion_defense(clean=(80, 100), undefended=(97, 100), robust=(20, 100), tpr=(40, 100))
    g = evaluate_gate(gate, _results(defenses=[weak]))
    failed = sorted(c["name"].split(":")[0] for c in g["checks"] if not c["passed"])
    assert failed == ["max_clean_accuracy_drop", "min_adaptive_robust_accuracy", "min_detection_recall"]
    nodet = _evasion_defense(clean=(95, 100), undefended=(97, 100), robust=(60, 100))
    g = evaluate_gate(GateSpec(min_detection_recall=0.3), _results(defenses=[nodet]))
    assert not g["passed"] and "no evasion defense with a detector" in g["failures"][0]


def test_a_profile_without_attacks_is_refused_unless_baseline_only():
    with pytest.raises(ProfileError) as exc:
        parse_profile({})
    assert "attacks" in str(exc.value) and "baseline_only" in str(exc.value)
    assert parse_profile({"baseline_only": True}).baseline_only
    with pytest.raises(ProfileError, match="baseline_only"):
        parse_profile({"baseline_only": True, "attacks": {"evasion": [{"name": "fgsm"}]}})


def test_require_gate_refuses_a_gate_without_thresholds(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"dataset": {"name": "digits"}, "attacks": {"evasion": [{"name": "fgsm"}]}}))
    runner = CliRunner()
    for cmd in (["validate", str(path), "--require-gate", "--schema-only"],
                ["run", str(path), "--require-gate", "--runs-dir", str(tmp_path / "runs")]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 2 and "sets no threshold" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "runs").exists()  # refused before anything was written
