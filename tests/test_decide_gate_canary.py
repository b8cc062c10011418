"""The release gate's ``max_canary_changes``: canary records whose prediction changed from the clean baseline's, on
every poisoning defense's model (else every poisoned model); passes and fails on the count, fails when nothing in
the run measured canaries, and a tiny run records the defended model's canary changes for it."""
from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from safedl.cli import app
from safedl.decide.gate import evaluate_gate
from safedl.profile import GateSpec
from safedl.utils.stats import proportion
from _profiles import tiny_profile


def _results(defense_changes: int | None, attack_changes: int = 7, n: int = 50) -> dict:
    attack = {"id": "bd", "category": "backdoor", "metrics": {"canary_changes": proportion(attack_changes, n)}}
    defenses = [] if defense_changes is None else [
        {"id": "dbscan", "against": "bd", "metrics": {"clean_accuracy_after": proportion(40, 50),
                                                     "canary_changes": proportion(defense_changes, n)}}]
    return {"baseline": {"metrics": {}}, "attacks": [attack], "defenses": defenses}


def test_gate_passes_and_fails_on_the_defended_models_count():
    ok = evaluate_gate(GateSpec(max_canary_changes=2), _results(2))
    assert ok["passed"] and [c["name"] for c in ok["checks"]] == ["max_canary_changes: dbscan vs bd"]
    bad = evaluate_gate(GateSpec(max_canary_changes=1), _results(2))
    assert not bad["passed"] and "2 of 50 canary records changed prediction > 1" in bad["failures"][0]


def test_without_a_poisoning_defense_the_poisoned_models_are_checked():
    bad = evaluate_gate(GateSpec(max_canary_changes=3), _results(None, attack_changes=7))
    assert not bad["passed"] and bad["checks"][0]["name"] == "max_canary_changes: bd"
    assert evaluate_gate(GateSpec(max_canary_changes=7), _results(None, attack_changes=7))["passed"]


def test_gate_fails_when_nothing_measured_canaries():
    res = _results(None)
    res["attacks"][0]["metrics"] = {}
    g = evaluate_gate(GateSpec(max_canary_changes=5), res)
    assert not g["passed"] and "canary_records.source" in g["failures"][0]
    g = evaluate_gate(GateSpec(max_canary_changes=5), {"baseline": {"metrics": {}}, "attacks": [], "defenses": []})
    assert not g["passed"] and "applies to nothing" in g["failures"][0]


def test_run_gate_counts_the_cleansed_models_canary_changes(tmp_path):
    prof = tiny_profile(
        name="tiny-canary-gate", training={"epochs": 6},
        attacks={"backdoor": [{"name": "static_patch", "params": {"target_class": 3, "patch_size": 2,
                                                                 "poison_fraction": 0.05}}]},
        defenses=[{"name": "dbscan", "against": ["static_patch"]}],
        canary_records={"source": "holdout", "n": 40},
        evaluation={"gate": {"max_canary_changes": 40}},
        output={"dir": "runs", "figures": False, "html": False})
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(prof))
    res = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--no-progress", "-q"])
    assert res.exit_code == 0, res.output
    r = json.loads((next((tmp_path / "runs").iterdir()) / "results.json").read_text())
    c = r["defenses"][0]["metrics"]["canary_changes"]
    assert c["n"] == 40
    check = next(ch for ch in r["gate"]["checks"] if ch["name"].startswith("max_canary_changes"))
    assert check["value"] == round(c["value"] * 40) and check["passed"]
    # the same results fail a limit below the observed count (when any changed)
    changed = int(check["value"])
    if changed:
        assert not evaluate_gate(GateSpec(max_canary_changes=changed - 1), r)["passed"]
