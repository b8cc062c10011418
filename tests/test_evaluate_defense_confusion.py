"""Confusion matrices of evasion-defended systems: clean, non-adaptive and adaptive decisions of the defended system
on the evaluation images, with a rejected column, consistent with the run's own metrics and shown in the report."""
from __future__ import annotations

import json

import torch
import yaml
from typer.testing import CliRunner

from safedl.cli import app
from safedl.evaluate.defense_confusion import decision_confusion
from _profiles import tiny_profile

PROFILE = tiny_profile(
    name="tiny-confusion",
    attacks={"evasion": [{"name": "pgd", "params": {"eps": 0.1, "steps": 10}}]},
    defenses=[{"name": "feature_squeezing_detector", "against": ["pgd"]},
              {"name": "spatial_smoothing", "against": ["pgd"]}],
    evaluation={"n_eval": 60, "n_examples": 0, "strong_adaptive": {"enabled": False}},
    output={"dir": "runs", "figures": False, "html": False},
)


def test_decision_confusion_puts_rejections_in_the_last_column():
    labels, y = torch.tensor([0, 1, 1, 2, 0]), torch.tensor([0, 1, 2, 2, 1])
    rejected = torch.tensor([False, False, True, False, True])
    assert decision_confusion(labels, rejected, y, 3) == [[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 1, 1]]


def _count(metric: dict) -> int:
    return round(metric["value"] * metric["n"])


def test_run_records_and_reports_the_defended_confusions(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(PROFILE))
    res = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--no-progress", "-q"])
    assert res.exit_code in (0, 1), res.output
    run = next((tmp_path / "runs").iterdir())
    r = json.loads((run / "results.json").read_text())
    for d in r["defenses"]:
        mats, m = d["confusion_evasion"]["matrices"], d["metrics"]
        assert set(mats) == {"clean", "non-adaptive", "adaptive"}
        rows = [sum(row) for row in mats["clean"]]
        for which in mats.values():
            assert len(which) == 10 and all(len(row) == 11 for row in which)
            assert [sum(row) for row in which] == rows and sum(rows) == 60  # same images, every class row
        correct = sum(mats["clean"][i][i] for i in range(10))
        assert correct == _count(m["clean_accuracy"])
        defended_na = sum(mats["non-adaptive"][i][i] + mats["non-adaptive"][i][10] for i in range(10))
        assert defended_na == _count(m["robust_accuracy_nonadaptive"])
        rejected = sum(row[10] for row in mats["clean"])
        if d["name"] == "feature_squeezing_detector":
            assert rejected == _count(m["clean_rejection_rate"])
        else:
            assert all(row[10] == 0 for mat in mats.values() for row in mat)  # nothing rejects without a detector
    report = (run / "report.md").read_text()
    assert "Confusion matrices of evasion-defended systems" in report
    assert "Confusion matrix: defense spatial_smoothing vs pgd, adaptive" in report
