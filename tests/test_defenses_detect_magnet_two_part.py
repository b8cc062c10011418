"""Two-part MagNet (Meng & Chen 2017): ``detector:magnet`` with ``placement: before_preprocessors`` scores the raw
input while ``magnet_reformer`` reforms what the classifier sees, as one defended system evaluated adaptively
(gradients through the autoencoder, detector-aware PGD against the detector on the raw input)."""
from __future__ import annotations

import json

import pytest
import torch

from safedl import registry
from safedl.deploy.pipeline import SecurePipeline
from safedl.errors import ConfigError
from safedl.evaluate.defend_evasion import evaluate_evasion_defense
from safedl.profile import DefenseSpec

from _stages import tiny_run_context, transferred_outcome

FAST = {"epochs": 10}


@pytest.fixture(scope="module")
def parts(tiny_model, digits_splits):
    x = digits_splits.train.x
    reformer = registry.create("preprocessor", "magnet_reformer", **FAST).fit(x, seed=0)
    before = registry.create("detector", "magnet", placement="before_preprocessors", **FAST).fit(
        x, model=tiny_model, x_calibration=digits_splits.val.x, seed=0)
    return reformer, before


def test_placement_is_validated_and_defaults_to_the_preprocessors_output():
    assert registry.create("detector", "magnet").sees_raw_input is False
    assert registry.create("detector", "magnet", placement="before_preprocessors").sees_raw_input is True
    with pytest.raises(ConfigError, match="placement"):
        registry.create("detector", "magnet", placement="inside")


def test_pipeline_scores_the_raw_input_in_front_of_the_reformer(parts, tiny_model, eval_batch):
    reformer, before = parts
    x, _ = eval_batch
    system = SecurePipeline(model=tiny_model, preprocessors=[reformer], detectors=[before])
    dec = system.decide(x)
    assert torch.allclose(dec.detector_scores["magnet"], before.score(x), atol=1e-6)  # x, not ae(x)
    assert not torch.allclose(dec.detector_scores["magnet"], before.score(reformer(x)), atol=1e-4)
    with torch.no_grad():
        assert torch.equal(dec.labels, tiny_model(reformer(x)).argmax(1))  # the classifier sees ae(x)
    # the differentiable score the detector-aware attack descends is on the raw input too
    xg = x.clone().requires_grad_(True)
    assert torch.allclose(system.detectors[0].score_torch(xg).detach(), before.score(x), atol=1e-5)


def test_stage_evaluates_two_part_magnet_adaptively(tmp_path, digits_splits, tiny_model, eval_batch):
    ctx = tiny_run_context(tmp_path, digits_splits, tiny_model, strong_adaptive={"enabled": False})
    outcome = transferred_outcome(tiny_model, eval_batch, name="pgd", params={"eps": 0.2, "steps": 10})
    comps = [registry.create("preprocessor", "magnet_reformer", **FAST),
             registry.create("detector", "magnet", placement="before_preprocessors", **FAST)]
    dspec = DefenseSpec(id="magnet_two_part", pipeline=[{"name": "magnet_reformer", "params": FAST},
                                                        {"name": "magnet", "params": {
                                                            "placement": "before_preprocessors", **FAST}}])
    entry = evaluate_evasion_defense(ctx, dspec, comps, outcome)
    json.dumps(entry)
    m = entry["metrics"]
    assert any("raw (in front of the preprocessors)" in s for s in entry["notes"])
    assert any("magnet_reformer: gradients" in s for s in entry["notes"])  # through the autoencoder
    assert any("detector-aware PGD" in s for s in entry["notes"])
    assert m["detection"]["tpr"]["value"] > m["detection"]["fpr"]["value"]
    assert m["detection_adaptive"]["tpr"]["value"] < m["detection"]["tpr"]["value"]
    assert m["robust_accuracy"]["value"] <= m["robust_accuracy_nonadaptive"]["value"]
    assert [c["params"].get("placement") for c in entry["components"]] == [None, "before_preprocessors"]
