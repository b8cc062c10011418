"""Confusion matrices of evasion-defended systems: clean, non-adaptive and adaptive decisions of the defended system
on the evaluation images, with a rejected column, consistent with the run's own metrics and shown in the report."""
from __future__ import annotations


import pytest
import torch

from safedl.deploy.pipeline import Decision
from safedl.evaluate.defense_confusion import decision_confusion, evasion_confusions, worst_case_decision

from _runs import run_profile
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


def _decision(labels, rejected, score):
    labels = torch.tensor(labels)
    return Decision(labels=labels, probs=torch.nn.functional.one_hot(labels, 3).float(),
                    rejected=torch.tensor(rejected), reasons=["detector:d" if r else None for r in rejected],
                    detector_scores={"d": torch.tensor(score)}, thresholds={"d": 0.5})


def test_worst_case_takes_per_sample_the_first_attack_that_breaks_it():
    y = torch.tensor([0, 1, 2, 0])
    a = _decision([0, 2, 2, 0], [False, False, False, True], [0.1, 0.2, 0.3, 0.9])  # breaks sample 1
    b = _decision([1, 0, 2, 0], [False, True, False, False], [0.0, 0.8, 0.1, 0.4])  # breaks sample 0 only
    c = _decision([0, 1, 1, 2], [False, False, False, False], [0.2, 0.3, 0.4, 0.0])  # breaks samples 2 and 3
    w = worst_case_decision([a, b, c], y)
    assert w.labels.tolist() == [1, 2, 1, 2] and w.rejected.tolist() == [False, False, False, False]
    assert w.detector_scores["d"].tolist() == pytest.approx([0.0, 0.2, 0.4, 0.0])
    assert w.probs.argmax(1).tolist() == w.labels.tolist()
    defended_by_all = torch.stack([d.defended(y) for d in (a, b, c)]).all(0)
    assert torch.equal(w.defended(y), defended_by_all)  # the union the robust accuracy counts
    # a sample no attack breaks keeps the first attack's decision; the last attack alone would show 2 broken, not 4
    w2 = worst_case_decision([a, _decision([0, 1, 2, 0], [False] * 4, [0.0] * 4)], y)
    assert w2.labels.tolist() == [0, 2, 2, 0] and w2.rejected.tolist() == [False, False, False, True]
    mat = evasion_confusions({"adaptive": w}, y, 3)["matrices"]["adaptive"]
    assert sum(mat[i][i] + mat[i][3] for i in range(3)) == int(defended_by_all.sum()) == 0


def test_worst_case_needs_decisions():
    with pytest.raises(ValueError, match="at least one"):
        worst_case_decision([], torch.tensor([0]))


def _count(metric: dict) -> int:
    return round(metric["value"] * metric["n"])


def test_run_records_and_reports_the_defended_confusions(tmp_path):
    run, r = run_profile(tmp_path, PROFILE)
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
        defended_ad = sum(mats["adaptive"][i][i] + mats["adaptive"][i][10] for i in range(10))
        assert defended_ad == _count(m["robust_accuracy"])  # the per-sample worst case over the adaptive suite
        rejected = sum(row[10] for row in mats["clean"])
        if d["name"] == "feature_squeezing_detector":
            assert rejected == _count(m["clean_rejection_rate"])
        else:
            assert all(row[10] == 0 for mat in mats.values() for row in mat)  # nothing rejects without a detector
    report = (run / "report.md").read_text()
    assert "Confusion matrices of evasion-defended systems" in report
    assert "Confusion matrix: defense spatial_smoothing vs pgd, adaptive" in report
