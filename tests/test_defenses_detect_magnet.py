"""MagNet's autoencoder detector (Meng & Chen 2017): reconstruction scores against a reference, clean-calibrated
FPR, detection of PGD, adaptive evasion through the differentiable score, bundle state round trip, the stage."""
from __future__ import annotations

import json

import pytest
import torch

from safedl import registry
from safedl.defenses.adaptive import DetectorAwarePGD
from safedl.defenses.detect.magnet import jensen_shannon
from safedl.deploy.state import fitted_state, restore_state
from safedl.errors import ConfigError
from safedl.evaluate.defend_evasion import evaluate_evasion_defense
from safedl.profile import DefenseSpec
from safedl.utils.stats import auroc
from safedl.utils.tensors import predict

from _stages import tiny_run_context, transferred_outcome


@pytest.fixture(scope="module")
def magnet(tiny_model, digits_splits):
    return registry.create("detector", "magnet", fpr=0.05).fit(digits_splits.train.x, model=tiny_model,
                                                              x_calibration=digits_splits.val.x, seed=0)


@pytest.fixture(scope="module")
def pgd_batch(tiny_model, eval_batch):
    x, y = eval_batch
    return registry.create("evasion", "pgd", eps=0.3, steps=10, seed=0)(tiny_model, x, y)


def test_scores_are_the_reconstruction_error(magnet, eval_batch):
    x, _ = eval_batch
    rec = magnet.reconstruct(x)
    ref = torch.stack([((xi - ri) ** 2).mean() for xi, ri in zip(x, rec)])  # slow per-image reference
    assert torch.allclose(magnet.score(x), ref, atol=1e-6)
    assert float(((x - rec) ** 2).mean()) < float(((x - x.mean()) ** 2).mean()) / 3  # it learned to reconstruct


def test_jsd_matches_a_reference():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]])
    q = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.5, 0.0]])
    m = (p + q) / 2
    ref0 = 0.5 * sum(a * torch.log(a / b) for a, b in zip(p[0], m[0])) + 0.5 * sum(
        a * torch.log(a / b) for a, b in zip(q[0], m[0]))
    out = jensen_shannon(p, q)
    assert float(out[0]) == pytest.approx(float(ref0), abs=1e-6) and float(out[1]) == pytest.approx(0.0, abs=1e-7)


def test_fpr_calibrated_on_clean_validation_and_pgd_detected(magnet, digits_splits, eval_batch, pgd_batch):
    x_test = digits_splits.test.x
    fpr = float(magnet.predict(x_test).float().mean())
    assert fpr < 0.05 + 0.05  # calibrated on validation for 5%: clean test images are flagged about as often
    x, _ = eval_batch
    assert auroc(magnet.score(x), magnet.score(pgd_batch)) > 0.9
    assert float(magnet.predict(pgd_batch).float().mean()) > 0.8


@pytest.mark.parametrize("metric", ["l1", "jsd"])
def test_other_metrics_separate_pgd(metric, tiny_model, digits_splits, eval_batch, pgd_batch):
    det = registry.create("detector", "magnet", metric=metric).fit(digits_splits.train.x, model=tiny_model,
                                                                             seed=0)
    x, _ = eval_batch
    assert auroc(det.score(x), det.score(pgd_batch)) > 0.9


def test_adaptive_attack_descends_the_detector_jointly(magnet, tiny_model, eval_batch, pgd_batch):
    x, y = eval_batch
    flagged_na = float(magnet.predict(pgd_batch).float().mean())
    x_ad = DetectorAwarePGD(eps=0.3, steps=40, seed=0)(tiny_model, [magnet], x, y)
    flagged_ad = float(magnet.predict(x_ad).float().mean())
    fooled = predict(tiny_model, x_ad) != y
    # the joint attack still fools the classifier, and MagNet flags its examples far less often than plain PGD's
    assert float(fooled.float().mean()) > 0.5
    assert flagged_ad < flagged_na - 0.3, (flagged_ad, flagged_na)


def test_bundle_state_round_trip_gives_the_same_scores(magnet, tiny_model, eval_batch):
    x, _ = eval_batch
    tensors, meta = fitted_state(magnet)
    assert any(k.startswith("ae_weights_.") for k in tensors)
    fresh = registry.create("detector", "magnet", **registry.creation_params(magnet))
    restore_state(fresh, tensors, meta, torch.device("cpu"))
    fresh.model_ = tiny_model
    assert torch.equal(fresh.score(x), magnet.score(x)) and fresh.threshold_ == magnet.threshold_


def test_same_seed_same_detector(tiny_model, digits_splits, eval_batch):
    x, _ = eval_batch
    a, b = (registry.create("detector", "magnet", epochs=3).fit(digits_splits.train.x[:300], model=tiny_model, seed=1)
            for _ in range(2))
    assert torch.equal(a.score(x), b.score(x))


@pytest.mark.parametrize("key,value", [("architecture", "III"), ("metric", "l3"), ("epochs", 0), ("noise", -1.0)])
def test_bad_params_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        registry.create("detector", "magnet", **{key: value})


def test_stage_reports_adaptive_detection(tmp_path, digits_splits, tiny_model, eval_batch):
    ctx = tiny_run_context(tmp_path, digits_splits, tiny_model)
    outcome = transferred_outcome(tiny_model, eval_batch, name="pgd", params={"eps": 0.3, "steps": 10})
    comp = registry.create("detector", "magnet", epochs=20)
    entry = evaluate_evasion_defense(ctx, DefenseSpec(name="magnet", params={"epochs": 20}), [comp], outcome)
    json.dumps(entry)
    m = entry["metrics"]
    assert m["detection"]["tpr"]["value"] > m["detection_adaptive"]["tpr"]["value"]
    assert m["robust_accuracy"]["value"] <= m["robust_accuracy_nonadaptive"]["value"]
    assert any("detector-aware PGD" in s for s in entry["notes"])
