"""End to end through the CLI with a poisoning attack and a cleanser: the defense entry is scored against the
attack's ground truth and carries the trusted-set assumption and the settings warnings."""
from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from safedl.cli import app
from _profiles import tiny_profile

PROFILE = tiny_profile(
    name="tiny-poison", training={"epochs": 8},
    attacks={"backdoor": [{"name": "static_patch", "params": {"target_class": 3, "patch_size": 2,
                                                             "poison_fraction": 0.1}}]},
    defenses=[{"name": "spectral_signatures", "against": ["static_patch"]}],
    trusted_clean_set={"source": "validation", "size": 100},
    evaluation={"n_examples": 2},
    output={"dir": "runs", "figures": False, "html": False},
)


def test_cli_run_with_a_backdoor_and_a_cleanser(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(PROFILE))
    res = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--no-progress", "-q"])
    assert res.exit_code == 0, res.output
    run_dir = next((tmp_path / "runs").iterdir())
    results = json.loads((run_dir / "results.json").read_text())
    attack = next(a for a in results["attacks"] if a["name"] == "static_patch")
    assert attack["metrics"]["attack_success_rate"]["n"] > 0
    entry = next(d for d in results["defenses"] if d["name"] == "spectral_signatures")
    det = entry["metrics"]["detection"]
    assert det["tpr"]["n"] == round(0.1 * (det["tpr"]["n"] + det["fpr"]["n"]))  # n = the planted poisons
    assert det["tpr"]["value"] > det["fpr"]["value"]
    assert "attack_success_rate_after" in entry["metrics"]
    assert any(n.startswith("trusted clean set: the validation split (100 images)") for n in entry["notes"])
    assert results["profile"]["trusted_clean_set"] == {"source": "validation", "path": None, "size": 100}


def test_cli_run_poisoned_before_the_split_with_the_untrusted_cleanser(tmp_path):
    profile = {**PROFILE, "threat_model": {"poison_stage": "before_split"},
               "dataset": {**PROFILE["dataset"], "holdout_fraction": 0.25},
               "defenses": [{"name": "isolate_cross_fit", "against": ["static_patch"]}]}
    del profile["trusted_clean_set"]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(profile))
    res = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--no-progress", "-q"])
    assert res.exit_code == 0, res.output
    results = json.loads((next((tmp_path / "runs").iterdir()) / "results.json").read_text())
    assert results["profile"]["trusted_clean_set"]["source"] == "none"
    attack = next(a for a in results["attacks"] if a["name"] == "static_patch")
    assert any("poisoned before the split" in n for n in attack["notes"])
    assert attack["metrics"]["clean_accuracy"]["n"] == 450  # the 25% hold-out of digits' 1797 images
    entry = next(d for d in results["defenses"] if d["name"] == "isolate_cross_fit")
    assert entry["metrics"]["whole_mode_classes"]["n"] == 10 and "whole_mode" in entry["info"]
    assert entry["metrics"]["detection"]["tpr"]["n"] > 0
    # export reloads the run's splits (drift reference) the way the run carved them: the hold-out first
    run_dir = next((tmp_path / "runs").iterdir())
    res = CliRunner().invoke(app, ["export", str(run_dir), "--baseline", "--out", str(tmp_path / "bundle")])
    assert res.exit_code == 0, res.output
