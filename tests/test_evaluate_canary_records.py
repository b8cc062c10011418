"""Canary records: known-good samples whose predictions a run stores; ``safedl retrain`` reports every changed
prediction and, with ``canary_records.max_changes``, refuses the replacement."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _profiles import tiny_profile
from safedl.decide.canary import canary_reasons, compare_canaries
from safedl.errors import DataError, ProfileError
from safedl.models import load_checkpoint
from safedl.profile import parse_profile
from safedl.rundir import RunDir
from safedl.utils.tensors import predict

BASE = tiny_profile(name="canary", dataset={"split_seed": 0}, evaluation=None, baseline_only=True,
                    output={"figures": False})


def _entry(preds, labels, sha="h", max_changes=None):
    return {"n": len(labels), "labels": labels, "predictions": preds, "images_sha256": sha, "max_changes": max_changes}


def test_compare_reports_exactly_the_changed_records():
    old = _entry([1, 2, 3, 4], [1, 2, 3, 0])
    new = _entry([1, 5, 3, 0], [1, 2, 3, 0], max_changes=1)
    c = compare_canaries(old, new)
    assert c["changed_indices"] == [1, 3] and c["broken_indices"] == [1] and c["passed"] is False
    assert c["changes"][0] == {"index": 1, "label": 2, "before": 2, "after": 5}
    assert "2 of 4 canary records changed" in canary_reasons(c)[0]
    assert compare_canaries(old, _entry([1, 2, 3, 4], [1, 2, 3, 0], max_changes=0))["passed"] is True
    assert compare_canaries(old, dict(new, max_changes=None))["passed"] is None  # reported, not gating
    assert canary_reasons(compare_canaries(old, dict(new, max_changes=None))) == []
    other = compare_canaries(old, _entry([1, 2, 3, 4], [1, 2, 3, 0], sha="other", max_changes=3))
    assert other["comparable"] is False and other["passed"] is False
    assert compare_canaries(None, new) is None


def test_canary_keys_are_validated():
    with pytest.raises(ProfileError, match="canary_records"):
        parse_profile(dict(BASE, canary_records={"source": "path"}))
    with pytest.raises(ProfileError, match="canary_records.n"):
        parse_profile(dict(BASE, canary_records={"source": "holdout", "n": 0}))


def test_too_many_canaries_fail_before_anything_is_written(tmp_path):
    from safedl.run import run_assessment

    prof = parse_profile(dict(BASE, canary_records={"source": "holdout", "n": 5000}))
    with pytest.raises(DataError, match="canary_records.n = 5000 but the test split holds only 360"):
        run_assessment(prof, base_dir=tmp_path, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_retrain_on_mislabelled_data_flips_canaries_and_is_refused(tmp_path, digits_splits):
    from safedl.run import run_assessment
    from safedl.run.retrain import decide_replacement, retrain

    prof = parse_profile(dict(BASE, canary_records={"source": "holdout", "n": 360, "max_changes": 0}))
    run_a, res_a = run_assessment(prof, base_dir=tmp_path, run_dir=tmp_path / "runs" / "a")
    can = res_a["canaries"]
    assert can["n"] == 360 and can["labels"] == digits_splits.test.y.tolist()
    # the stored predictions are the baseline's own
    model, _ = load_checkpoint(RunDir(run_a).baseline_model)
    assert predict(model, digits_splits.test.x).tolist() == can["predictions"]
    # reviewed data that poison: every training 3 again, labelled 8
    threes = digits_splits.train.x[digits_splits.train.y == 3]
    np.savez(tmp_path / "reviewed.npz", x=threes.numpy(), y=np.full(len(threes), 8, dtype=np.int64))
    run_b, doc = retrain(run_a, added=[tmp_path / "reviewed.npz"], runs_dir=tmp_path / "runs")
    new = json.loads((run_b / "results.json").read_text())["canaries"]
    flipped = [i for i, (a, b) in enumerate(zip(can["predictions"], new["predictions"])) if a != b]
    check = doc["canaries"]
    assert flipped and check["changed_indices"] == flipped and check["changed"] == len(flipped)
    assert any(c["label"] == 3 and c["after"] == 8 for c in check["changes"])
    assert check["passed"] is False and doc["replace"] is False
    assert any(r.startswith("canary:") for r in doc["reasons"])
    assert json.loads((run_b / "retrain.json").read_text())["canaries"] == check
    # without max_changes the changes are reported but do not decide
    res_b = json.loads((run_b / "results.json").read_text())
    res_b["canaries"]["max_changes"] = None
    decision = decide_replacement(("a", res_a), ("b", res_b))
    assert decision["canaries"]["changed"] == len(flipped) and not any(r.startswith("canary:")
                                                                        for r in decision["reasons"])


def test_poisoning_stage_reports_the_canary_predictions_its_retraining_changed(digits_splits, tiny_model, tmp_path):
    from safedl import registry
    from safedl.evaluate.context import RunContext
    from safedl.models import TrainRecipe, build_model, with_normalization
    from safedl.profile import AttackSpec, CanarySpec, Profile
    from safedl.run.handlers import get_attack_handler

    def fresh():
        return with_normalization(build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8),
                                  digits_splits.mean, digits_splits.std)

    profile = Profile(seed=0, training=TrainRecipe(epochs=15, batch_size=64, lr=3e-3, augment="none"),
                      canary_records=CanarySpec(source="holdout", n=200))
    ctx = RunContext(profile=profile, splits=digits_splits, device=torch.device("cpu"), run_dir=tmp_path,
                     baseline=tiny_model, build_fresh=fresh)
    params = {"strategy": "one_to_one", "source_classes": [3], "target_class": 8, "flip_rate": 0.6}
    out = get_attack_handler("poisoning")(ctx, AttackSpec(name="label_flipping", params=params),
                                          registry.create("poisoning", "label_flipping", **params))
    model = fresh()
    model.load_state_dict(out.state["model_state"])
    x = digits_splits.test.x[:200]
    expected = int((predict(model.eval(), x) != predict(tiny_model, x)).sum())
    m = out.entry["metrics"]["canary_changes"]
    assert m["n"] == 200 and round(m["value"] * 200) == expected > 0
