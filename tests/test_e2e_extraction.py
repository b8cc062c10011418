"""The extraction stage and its defense stage through the run spine: curves, intervals, transfer, report figure."""
from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from safedl.cli import app
from _profiles import tiny_profile

PROFILE = tiny_profile(
    name="steal", training={"epochs": 8},
    attacks={"extraction": [{"name": "copycat", "params": {"surrogate": "tiny_cnn", "epochs": 15, "lr": 0.003,
                                                           "budgets": [60, 300], "transfer_eps": 0.3}}]},
    defenses=[{"name": "class_labels"}, {"name": "reverse_sigmoid", "params": {"beta": 0.7}},
              {"name": "dp_training", "params": {"epochs": 2}}],
    evaluation={"n_eval": 100, "batch_size": None},
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extraction")
    path = tmp / "p.yaml"
    path.write_text(yaml.safe_dump(PROFILE))
    res = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp / "runs"), "--no-progress", "-q"])
    assert res.exit_code == 0, res.output
    run_dir = next((tmp / "runs").iterdir())
    return run_dir, json.loads((run_dir / "results.json").read_text())


def test_attack_entry_has_the_curve_with_intervals_and_transfer(results):
    run_dir, r = results
    (a,) = r["attacks"]
    assert a["category"] == "extraction" and a["access"] == "scores"
    assert [p["budget"] for p in a["curve"]] == [60, 300] and [p["queries"] for p in a["curve"]] == [60, 300]
    for p in a["curve"]:
        for m in (p["fidelity"], p["surrogate_accuracy"]):
            assert m["n"] == 360 and m["ci95"][0] <= m["value"] <= m["ci95"][1]
    assert a["curve"][1]["fidelity"]["value"] > a["curve"][0]["fidelity"]["value"]
    assert a["metrics"]["attack_success_rate"] == a["curve"][1]["fidelity"]
    t = a["metrics"]["transfer_success_rate"]
    assert 0 < t["n"] <= 100 and t["value"] > 0.1  # examples crafted on the stolen copy fool the victim
    assert (run_dir / "artifacts" / "figures" / "extraction_copycat.png").is_file()
    assert "extraction_copycat.png" in (run_dir / "report.md").read_text()


def test_defense_entries_compare_curves_with_and_without(results):
    _, r = results
    d = {e["id"]: e for e in r["defenses"]}
    assert set(d) == {"class_labels", "reverse_sigmoid", "dp_training"}
    for e in d.values():
        assert e["against"] == "copycat" and len(e["curve_after"]) == 2 and e["curve_before"] == r["attacks"][0]["curve"]
        assert e["metrics"]["attack_success_rate_after"] == e["curve_after"][-1]["fidelity"]
    # class_labels keeps every label: users lose nothing
    base = r["baseline"]["metrics"]["clean_accuracy"]["value"]
    assert d["class_labels"]["metrics"]["clean_accuracy_after"]["value"] == pytest.approx(base)
    # the DP-SGD victim is a different, retrained model: its privacy budget is reported next to its curve
    assert d["dp_training"]["kind"] == "trainer" and d["dp_training"]["metrics"]["epsilon_spent"]["value"] > 0
