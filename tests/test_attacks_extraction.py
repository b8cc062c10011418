"""Extraction attacks (copycat, Jacobian augmentation) through the counted oracle, on 8x8 digits and tiny_cnn."""
from __future__ import annotations

import pytest
import torch

from safedl import registry
from safedl.evaluate.attack_extraction import extraction_curve
from safedl.attacks.extraction.base import ExtractionOracle
from safedl.errors import ConfigError, ProfileError, QueryBudgetExceeded
from safedl.profile import parse_profile

CPU = torch.device("cpu")


def _attack(name, **kw):
    base = {"surrogate": "tiny_cnn", "epochs": 30, "lr": 3e-3}
    if name == "jacobian_augmentation":
        base["seed_size"] = 30
    return registry.create("extraction", name, **(base | kw))


def _curve(model, splits, name, output, budgets, postprocess=None):
    pts, _ = extraction_curve(model, _attack(name, budgets=budgets), splits.train.x, splits.test.x, splits.test.y,
                              output=output, num_classes=10, device=CPU, postprocess=postprocess)
    return [p["fidelity"]["value"] for p in pts], pts


def test_oracle_counts_logs_and_refuses_past_the_budget(tiny_model, digits_splits):
    oracle = ExtractionOracle(tiny_model, budget=10, output="labels")
    x = digits_splits.test.x[:6]
    assert oracle(x).shape == (6,) and oracle.remaining == 4
    with pytest.raises(QueryBudgetExceeded):
        oracle(digits_splits.test.x[:5])
    log = oracle.log()
    assert len(log) == 6 and torch.equal(log.x, x) and torch.equal(log.labels(), tiny_model(x).argmax(1))


@pytest.mark.parametrize("name", ["copycat", "jacobian_augmentation"])
def test_attack_spends_exactly_its_budget_through_the_oracle(tiny_model, digits_splits, name):
    oracle = ExtractionOracle(tiny_model, budget=170, output="scores")
    result = _attack(name, epochs=2).extract(oracle, digits_splits.train.x, num_classes=10)
    assert oracle.used == 170 and len(result.log) == 170
    assert result.log.answers.shape == (170, 10)  # the scores the interface returned are what was learned from
    assert not result.surrogate.training


def test_copycat_fidelity_beats_chance_and_rises_with_the_budget(tiny_model, digits_splits):
    fid, pts = _curve(tiny_model, digits_splits, "copycat", "scores", [40, 400])
    assert pts[0]["fidelity"]["n"] == len(digits_splits.test)
    assert fid[1] > 0.8  # chance agreement for 10 classes is about 0.1
    assert pts[1]["fidelity"]["ci95"][0] > pts[0]["fidelity"]["ci95"][1]  # significantly higher with more queries


def test_labels_only_answers_lower_jacobian_extraction_fidelity(tiny_model, digits_splits):
    scores, _ = _curve(tiny_model, digits_splits, "jacobian_augmentation", "scores", [400])
    labels, _ = _curve(tiny_model, digits_splits, "jacobian_augmentation", "labels", [400])
    assert labels[0] < scores[0]


def test_budgets_and_pool_are_validated():
    with pytest.raises(ConfigError, match="budgets"):
        registry.create("extraction", "copycat", budgets=[500, 250])
    with pytest.raises(ConfigError, match="pool"):
        registry.create("extraction", "copycat", pool="imagenet")


def test_profile_accepts_extraction_and_refuses_it_without_an_interface():
    p = parse_profile({"attacks": {"extraction": [{"name": "copycat", "params": {"budgets": [100]}}]}})
    assert [(c, a.name) for c, a in p.attacks.all()] == [("extraction", "copycat")]
    with pytest.raises(ProfileError, match="no query attack is possible"):
        parse_profile({"threat_model": {"interface_exposed": "none"},
                       "attacks": {"extraction": [{"name": "jacobian_augmentation"}]}})
