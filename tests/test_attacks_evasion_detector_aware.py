"""Detector-aware adaptive attacks for threats without an eps ball (sparse_rs: L0; adversarial_patch): the
detectors' hinge joins the attack's objective, and the result evades (misclassified and undetected) at least as
often as the plain attack; a run uses it against a detector."""
from __future__ import annotations


import pytest
import torch

from safedl import registry
from safedl.deploy.pipeline import SecurePipeline
from safedl.errors import ConfigError
from safedl.evaluate.defend_evasion import detector_hinge

from _runs import run_profile
from _profiles import tiny_profile


@pytest.fixture(scope="module")
def system(tiny_model, digits_splits):
    det = registry.create("detector", "magnet", epochs=10, fpr=0.05)
    det.fit(digits_splits.train.x, model=tiny_model, y=digits_splits.train.y, x_calibration=digits_splits.val.x,
            seed=0)
    return SecurePipeline(model=tiny_model, detectors=[det], input_shape=digits_splits.shape)


def _evades(system, x_adv, y) -> int:
    return int((~system.decide(x_adv).defended(y)).sum())


@pytest.mark.parametrize("name, params", [("sparse_rs", {"k": 6, "max_queries": 150}),
                                          ("adversarial_patch", {"patch_fraction": 0.15, "steps": 60})])
def test_aware_attack_evades_at_least_as_often(system, eval_batch, name, params):
    x, y = eval_batch[0][:100], eval_batch[1][:100]
    attack = registry.create("evasion", name, **params)
    model = system.deployed if attack.access == "scores" else system.attack_surface()
    plain = attack(model, x, y)
    aware = attack.with_penalty(detector_hinge(system.detectors))(model, x, y)
    if name == "sparse_rs":  # still the L0 threat: at most k pixels changed
        assert int(((aware - x).abs() > 1e-6).any(1).flatten(1).sum(1).max()) <= params["k"]
    assert _evades(system, aware, y) >= _evades(system, plain, y) > 0


def test_hinge_is_zero_exactly_when_undetected(system, eval_batch):
    x = eval_batch[0][:64]
    pen = detector_hinge(system.detectors)(x)
    flagged = system.decide(x).rejected
    assert torch.equal(pen > 0, flagged) and bool((pen >= 0).all())
    with pytest.raises(ConfigError, match="takes no penalty"):
        registry.create("evasion", "pgd").with_penalty(lambda z: z.sum((1, 2, 3)))


def test_run_attacks_the_detector_with_the_aware_l0_attack(tmp_path):
    prof = tiny_profile(
        name="tiny-aware-l0",
        attacks={"evasion": [{"name": "sparse_rs", "params": {"k": 6, "max_queries": 60}}]},
        defenses=[{"name": "magnet", "params": {"epochs": 5}, "against": ["sparse_rs"]}],
        evaluation={"n_eval": 40, "n_examples": 0, "strong_adaptive": {"enabled": False}},
        output={"dir": "runs", "figures": False, "html": False})
    (d,) = run_profile(tmp_path, prof)[1]["defenses"]
    assert any("sparse_rs with every detector's score above its threshold" in n for n in d["notes"]), d["notes"]
    assert not any("no detector-aware PGD was run" in n for n in d["notes"])
    m = d["metrics"]
    assert m["robust_accuracy"]["value"] <= m["robust_accuracy_paired_adaptive"]["value"] + 1e-9
