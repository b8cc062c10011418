"""Honesty (issue 30): models at chance are flagged in the report, recommend and the gate; the interval wording says
what the intervals show; DP training's secure_mode is a parameter; the report carries the clean confusion matrix."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from _profiles import tiny_profile
from safedl import registry
from safedl.cli import app
from safedl.data.dataset import Dataset
from safedl.decide.chance import chance_flags, fail_on_chance
from safedl.decide.recommend import recommend, to_markdown
from safedl.errors import ConfigError
from safedl.models import TrainRecipe
from safedl.report.render import build_blocks, to_markdown as report_md
from safedl.utils.confusion import confusion_counts
from safedl.utils.stats import proportion


def _results(defenses: list[dict]) -> dict:
    """A results.json mapping: one evasion attack (robust accuracy 0.3 of 300) and the given defenses."""
    return {"schema_version": 1, "run_id": "r", "profile": {"name": "t", "seed": 0, "threat_model": {},
                                                            "model": {"arch": "tiny_cnn"}, "defenses": []},
            "data": {"name": "digits", "shape": [1, 8, 8], "num_classes": 10, "class_names": [],
                     "sizes": {"train": 1, "val": 1, "test": 300}},
            "baseline": {"metrics": {"clean_accuracy": proportion(270, 300)}},
            "attacks": [{"id": "pgd", "name": "pgd", "category": "evasion", "params": {},
                         "metrics": {"robust_accuracy": proportion(90, 300), "clean_accuracy": proportion(270, 300)}}],
            "defenses": defenses, "failed_stages": [],
            "risk": {"rule": "r", "overall_level": "high", "residual_level": "high", "per_attack": []},
            "gate": {"passed": True, "configured": False, "checks": [], "failures": []}, "environment": {}}


def _defense(did: str, robust: int, clean: int) -> dict:
    return {"id": did, "name": did, "kind": "trainer", "against": "pgd",
            "metrics": {"robust_accuracy": proportion(robust, 300), "clean_accuracy": proportion(clean, 300),
                        "clean_accuracy_undefended": proportion(270, 300)}}


def test_disjoint_intervals_that_got_worse_are_not_called_overlapping():
    rec = recommend(_results([_defense("worse", 30, 260)]), priors=[])
    why = rec["attacks"][0]["candidates"][0]["why"]
    assert "overlap" not in why and "separate, higher with it (it made things worse)" in why
    rec = recommend(_results([_defense("better", 200, 260)]), priors=[])
    c = rec["attacks"][0]["candidates"][0]
    assert c["helps"] and "separate, lower with it" in c["why"]
    rec = recommend(_results([_defense("same", 95, 260)]), priors=[])
    assert "95% intervals overlap: with it [" in rec["attacks"][0]["candidates"][0]["why"]


def test_a_defense_at_chance_is_flagged_never_recommended_and_fails_the_gate():
    # robust accuracy 1.0 on a model that is right on 10% of clean images: "helps" only by predicting one class
    res = _results([_defense("collapsed", 300, 30), _defense("fine", 200, 260)])
    flags = chance_flags(res)
    assert [f["subject"] for f in flags] == ["collapsed vs pgd"] and flags[0]["upper95"] < 0.15
    rec = recommend(res, priors=[])
    by = {c["defense"]: c for c in rec["attacks"][0]["candidates"]}
    assert by["collapsed"]["at_chance"] and not by["collapsed"]["helps"] and "AT CHANCE" in by["collapsed"]["why"]
    assert rec["attacks"][0]["recommended"]["defense"] == "fine"
    assert "Models at chance" in to_markdown(rec)
    gate = fail_on_chance(res["gate"], res)
    assert not gate["passed"] and any(f.startswith("not_at_chance: collapsed vs pgd") for f in gate["failures"])
    text = report_md(build_blocks(res, {}))
    assert "## Models at chance" in text and "collapsed vs pgd" in text.split("## Models at chance")[1][:600]
    # at exactly the limit's other side nothing is flagged: 0.2 of 300 has an upper bound above 0.15
    assert chance_flags(_results([_defense("low", 300, 60)])) == []


def test_confusion_counts_and_the_report_table():
    pred, y = torch.tensor([0, 1, 1, 2, 2, 2]), torch.tensor([0, 1, 2, 2, 2, 0])
    assert confusion_counts(pred, y, 3) == [[1, 0, 1], [0, 1, 0], [0, 1, 2]]
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion_counts(torch.tensor([3]), torch.tensor([0]), 3)
    res = _results([])
    res["baseline"]["confusion"] = confusion_counts(pred, y, 3)
    text = report_md(build_blocks(res, {}))
    assert "### Confusion matrix: baseline" in text and "| 2 | 0 | 1 | 2 |" in text


def test_dp_training_secure_mode_is_a_parameter_and_the_rng_warning_is_silenced():
    dp = registry.create("trainer", "dp_training", target_epsilon=8.0, epochs=1)
    assert dp.secure_mode is False
    data = Dataset(torch.rand(64, 1, 8, 8), torch.randint(0, 3, (64,)), 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dp.fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), data, recipe=TrainRecipe(epochs=1, batch_size=32), seed=0)
    assert not [w for w in caught if "Secure RNG" in str(w.message)]
    assert dp.facts()["secure_mode"] == 0.0
    with pytest.raises(ConfigError, match="secure_mode must be true or false"):
        registry.create("trainer", "dp_training", secure_mode="yes")
    try:
        import torchcsprng  # noqa: F401
    except ImportError:
        secure = registry.create("trainer", "dp_training", secure_mode=True, epochs=1)
        with pytest.raises(ConfigError, match="torchcsprng"):
            secure.fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), data,
                       recipe=TrainRecipe(epochs=1, batch_size=32), seed=0)


COLLAPSE = tiny_profile(
    name="tiny-collapse",
    attacks={"poisoning": [{"name": "label_flipping", "params": {"flip_rate": 0.2}}]},
    defenses=[{"name": "robust_loss", "params": {"loss": "symmetric_cross_entropy"}, "against": ["label_flipping"]},
              {"name": "dp_training", "against": ["label_flipping"]}],
    evaluation={"gate": {"min_clean_accuracy": 0.5}},
    output={"dir": "runs", "figures": False, "html": False},
)


def test_issue30_collapse_of_robust_loss_and_dp_training_is_flagged_end_to_end(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(COLLAPSE))
    res = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--no-progress", "-q",
                                   "--recommend"])
    run_dir = next((tmp_path / "runs").iterdir())
    results = json.loads((run_dir / "results.json").read_text())
    collapsed = {f["subject"] for f in chance_flags(results)}
    assert {"robust_loss vs label_flipping", "dp_training vs label_flipping"} <= collapsed, collapsed
    assert res.exit_code == 1, res.output  # the baseline passes min_clean_accuracy; the collapsed models fail
    assert "not_at_chance: robust_loss vs label_flipping" in res.output
    report = (run_dir / "report.md").read_text()
    assert "## Models at chance" in report and "### Confusion matrix: defense dp_training vs label_flipping" in report
    recs = (run_dir / "recommendations.md").read_text()
    assert "**Models at chance**" in recs and "AT CHANCE" in recs
