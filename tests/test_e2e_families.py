"""The issue-30 part B components through ``safedl run`` on tiny data: a profile names them by registry name, the
patch and L0 attacks carry their threat, and MagNet, LGS and the ensemble are evaluated against them."""
from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from safedl.cli import app
from _profiles import tiny_profile

PROFILE = tiny_profile(
    attacks={"evasion": [{"name": "sparse_rs", "params": {"k": 6, "max_queries": 60}},
                         {"name": "adversarial_patch", "params": {"patch_fraction": 0.15, "steps": 40}},
                         {"name": "pgd", "params": {"eps": 0.2, "steps": 5}}]},
    defenses=[{"name": "magnet", "params": {"epochs": 5}, "against": ["pgd", "sparse_rs"]},
              {"name": "local_gradient_smoothing", "against": ["adversarial_patch"]},
              {"name": "model_ensemble", "params": {"members": 2}, "against": ["pgd"]}],
    evaluation={"n_eval": 60, "n_examples": 0, "strong_adaptive": {"enabled": False}},
    output={"dir": "runs", "figures": False},
)


def test_profile_runs_the_new_components(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(PROFILE))
    res = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--no-progress", "-q"])
    assert res.exit_code == 0, res.output  # no evaluation.gate thresholds: not configured, exit 0
    r = json.loads((next((tmp_path / "runs").iterdir()) / "results.json").read_text())
    attacks = {a["id"]: a for a in r["attacks"]}
    assert attacks["sparse_rs"]["threat"]["pixels"] == 6
    assert attacks["sparse_rs"]["metrics"]["perturbation"]["l0_max"]["value"] <= 6
    assert attacks["adversarial_patch"]["threat"]["kind"] == "patch"
    got = {(d["name"], d["against"]) for d in r["defenses"]}
    assert {("magnet", "pgd"), ("magnet", "sparse_rs"), ("local_gradient_smoothing", "adversarial_patch"),
            ("model_ensemble", "pgd")} <= got
    for d in r["defenses"]:
        m = d["metrics"]
        assert m["robust_accuracy"]["value"] <= m["robust_accuracy_nonadaptive"]["value"] + 1e-9


def test_profile_runs_the_dbscan_cleanser_against_a_backdoor(tmp_path):
    prof = tiny_profile(
        name="tiny-dbscan", training={"epochs": 8},
        attacks={"backdoor": [{"name": "static_patch", "params": {"target_class": 3, "patch_size": 2,
                                                                 "poison_fraction": 0.03}}]},
        defenses=[{"name": "dbscan", "against": ["static_patch"]}],
        output={"dir": "runs", "figures": False, "html": False})
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(prof))
    res = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--no-progress", "-q"])
    assert res.exit_code == 0, res.output
    r = json.loads((next((tmp_path / "runs").iterdir()) / "results.json").read_text())
    det = next(d for d in r["defenses"] if d["name"] == "dbscan")["metrics"]["detection"]
    assert det["tpr"]["value"] > det["fpr"]["value"]  # scored against the attack's ground truth
