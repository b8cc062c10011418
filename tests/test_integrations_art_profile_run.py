"""Differential runs through a profile: ART's PGD against safedl's pgd, ART's FeatureSqueezing and SpatialSmoothing
against safedl's, each evaluated by the same pipeline (adaptive through BPDA), matching within their 95% intervals."""
from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from safedl.cli import app
from _profiles import tiny_profile

pytest.importorskip("art")

PGD = {"eps": 0.1, "steps": 10, "alpha": 0.02, "random_start": False}
ART_PGD = {"eps": 0.1, "max_iter": 10, "eps_step": 0.02, "num_random_init": 0}
PROFILE = tiny_profile(
    attacks={"evasion": [{"name": "pgd", "params": PGD},
                         {"name": "art:ProjectedGradientDescent", "id": "art_pgd", "params": ART_PGD}]},
    defenses=[
        {"name": "feature_squeezing", "params": {"bit_depth": 3}, "against": ["pgd"]},
        {"name": "art:FeatureSqueezing", "id": "art_fs", "params": {"bit_depth": 3}, "against": ["art_pgd"]},
        {"name": "spatial_smoothing", "params": {"window": 3}, "against": ["pgd"]},
        {"name": "art:SpatialSmoothing", "id": "art_ss", "params": {"window_size": 3}, "against": ["art_pgd"]},
    ],
    evaluation={"n_eval": 100, "batch_size": 100, "strong_adaptive": {"steps": 10, "restarts": 1}},
    output={"dir": "runs", "html": False},
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("artrun")
    path = tmp / "p.yaml"
    path.write_text(yaml.safe_dump(PROFILE))
    res = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp / "runs"), "--no-progress", "-q"])
    assert res.exit_code == 0, res.output  # no evaluation.gate thresholds: not configured, exit 0
    run_dir = next((tmp / "runs").iterdir())
    return json.loads((run_dir / "results.json").read_text())


def _overlap(a: dict, b: dict) -> bool:
    return a["ci95"][0] <= b["ci95"][1] and b["ci95"][0] <= a["ci95"][1]


def test_art_pgd_matches_native_pgd_through_the_pipeline(results):
    attacks = {a["id"]: a for a in results["attacks"]}
    assert not results.get("failed_stages")
    ours, theirs = attacks["pgd"]["metrics"], attacks["art_pgd"]["metrics"]
    assert attacks["art_pgd"]["name"] == "art:ProjectedGradientDescent" and attacks["art_pgd"]["params"]["eps"] == 0.1
    for key in ("robust_accuracy", "attack_success_rate"):
        assert _overlap(ours[key], theirs[key]), (key, ours[key], theirs[key])
    assert theirs["robust_accuracy"]["value"] < theirs["clean_accuracy"]["value"]  # the ART attack did something
    assert theirs["perturbation"]["linf_max"]["value"] <= 0.1 + 1e-6


@pytest.mark.parametrize("native,art", [("feature_squeezing", "art_fs"), ("spatial_smoothing", "art_ss")])
def test_art_preprocessor_matches_native_through_the_pipeline(results, native, art):
    defenses = {d["id"]: d for d in results["defenses"]}
    ours, theirs = defenses[native]["metrics"], defenses[art]["metrics"]
    for key in ("clean_accuracy", "robust_accuracy_nonadaptive", "robust_accuracy"):
        assert _overlap(ours[key], theirs[key]), (key, ours[key], theirs[key])
    assert any("BPDA" in n for n in defenses[art]["notes"])  # evaluated adaptively through BPDA
    assert defenses[art]["components"][0]["name"].startswith("art:")


def test_art_backdoor_runs_through_the_poisoning_stage(tmp_path):
    prof = tiny_profile(
        attacks={"backdoor": [{"name": "art:PoisoningAttackBackdoor", "id": "art_bd",
                               "params": {"perturbation_params": {"distance": 1}, "target_class": 0,
                                          "poison_fraction": 0.1}}]},
        output={"dir": "runs", "html": False, "figures": False})
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(prof))
    res = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--no-progress", "-q"])
    assert res.exit_code == 0, res.output  # no evaluation.gate thresholds: not configured, exit 0
    r = json.loads(next((tmp_path / "runs").iterdir()).joinpath("results.json").read_text())
    (a,) = r["attacks"]
    assert a["category"] == "backdoor" and not r.get("failed_stages")
    asr = a["metrics"]["attack_success_rate"]
    assert asr["n"] > 0 and asr["ci95"][0] > 1 / 10  # the trigger steers well above chance (10 classes)
