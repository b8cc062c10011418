"""Eps sweeps: ``params.eps: [..]`` runs the attack once per value (ids ``<id>@<eps>``, scalar ``params.eps``),
``against: [<id>]`` covers every value, and the report draws robust accuracy vs eps with 95% intervals."""
from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from safedl.cli import app
from safedl.errors import ProfileError
from safedl.profile import parse_profile
from safedl.report.eps_curve import curves, sweep_groups
from _profiles import tiny_profile

EPS = [0.02, 0.05, 0.1]


def test_a_sweep_expands_into_one_attack_per_eps_and_against_covers_them_all():
    p = parse_profile(tiny_profile(
        attacks={"evasion": [{"name": "fgsm", "params": {"eps": 0.1}},
                             {"name": "pgd", "id": "p", "params": {"eps": EPS, "steps": 3}}]},
        defenses=[{"name": "feature_squeezing", "against": ["p"]}, {"name": "spatial_smoothing", "against": ["fgsm"]}]))
    assert [a.key for a in p.attacks.evasion] == ["fgsm", "p@0.02", "p@0.05", "p@0.1"]
    assert [a.params["eps"] for a in p.attacks.evasion[1:]] == EPS
    assert all(a.params["steps"] == 3 for a in p.attacks.evasion[1:])
    assert p.defenses[0].against == ["p@0.02", "p@0.05", "p@0.1"] and p.defenses[1].against == ["fgsm"]


@pytest.mark.parametrize("eps,needle", [([], "empty list"), ([0.1, 0.1], "distinct"), (["a"], "positive numbers"),
                                        ([0.1, -0.2], "positive numbers"), ([0.1, 2.0], "pixel range")])
def test_a_bad_sweep_is_one_profile_error_naming_the_attack_as_written(eps, needle):
    prof = tiny_profile(attacks={"evasion": [{"name": "fgsm", "params": {"eps": 0.1}},
                                             {"name": "pgd", "params": {"eps": eps}}]})
    with pytest.raises(ProfileError) as exc:
        parse_profile(prof)
    assert needle in str(exc.value)
    assert all(loc.startswith("attacks.evasion[1]") for loc, _ in exc.value.errors), exc.value.errors


def test_sweep_groups_keep_only_real_sweeps_sorted_by_eps():
    m = {"value": 0.5, "ci95": [0.4, 0.6], "n": 100}
    attacks = [{"id": "pgd@0.1", "params": {"eps": 0.1}, "metrics": {"robust_accuracy": m}},
               {"id": "pgd@0.02", "params": {"eps": 0.02}, "metrics": {"robust_accuracy": m}},
               {"id": "me@home", "params": {"eps": 0.1}, "metrics": {"robust_accuracy": m}},
               {"id": "x@0.1", "params": {"eps": 0.1}, "metrics": {"robust_accuracy": m}}]
    groups = sweep_groups(attacks)
    assert list(groups) == ["pgd"] and [a["id"] for a in groups["pgd"]] == ["pgd@0.02", "pgd@0.1"]
    lines = curves(groups["pgd"], [{"id": "fs", "against": "pgd@0.1", "metrics": {"robust_accuracy": m}}])
    assert [e for e, _ in lines["undefended"]] == [0.02, 0.1] and [e for e, _ in lines["with fs (adaptive)"]] == [0.1]


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    prof = tiny_profile(
        attacks={"evasion": [{"name": "pgd", "params": {"eps": EPS, "steps": 5}}]},
        defenses=[{"name": "feature_squeezing", "params": {"bit_depth": 3}, "against": ["pgd"]}],
        evaluation={"n_eval": 60, "strong_adaptive": {"enabled": False}},
        output={"dir": "runs", "html": False})
    path = tmp / "p.yaml"
    path.write_text(yaml.safe_dump(prof))
    res = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp / "runs"), "--no-progress", "-q"])
    assert res.exit_code == 0, res.output  # no evaluation.gate thresholds: not configured, exit 0
    run_dir = next((tmp / "runs").iterdir())
    return run_dir, json.loads((run_dir / "results.json").read_text())


def test_a_tiny_sweep_run_has_one_entry_per_eps_inside_its_ball(sweep_run):
    _, r = sweep_run
    attacks = r["attacks"]
    assert [a["id"] for a in attacks] == ["pgd@0.02", "pgd@0.05", "pgd@0.1"]
    for a, eps in zip(attacks, EPS):
        assert a["params"]["eps"] == eps and a["name"] == "pgd"
        assert a["metrics"]["robust_accuracy"]["n"] == 60
        assert 0 < a["metrics"]["perturbation"]["linf_max"]["value"] <= eps + 1e-6
    assert sorted(d["against"] for d in r["defenses"]) == ["pgd@0.02", "pgd@0.05", "pgd@0.1"]


def test_the_report_draws_and_references_the_eps_curve(sweep_run):
    run_dir, _ = sweep_run
    md = (run_dir / "report.md").read_text()
    fig = run_dir / "artifacts" / "figures" / "eps_sweep_pgd.png"
    assert fig.is_file() and fig.stat().st_size > 1000
    assert "artifacts/figures/eps_sweep_pgd.png" in md and "Robustness vs eps: pgd (3 values)" in md


def test_the_eps_sweep_example_validates():
    pytest.importorskip("art")
    from safedl.profile import load_profile

    p = load_profile("examples/eps_sweep.yaml")
    assert [a.key for a in p.attacks.evasion][:5] == [f"pgd@{e:g}" for e in (0.01, 0.03, 0.05, 0.1, 0.2)]
    assert len(p.attacks.evasion) == 10
