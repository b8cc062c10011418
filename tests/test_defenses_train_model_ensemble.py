"""model_ensemble: M seeds' softmax averaged, attacked as a whole; the adaptive attack on the ensemble is at least as
strong as transfer from one member, and the stage measures it that way."""
from __future__ import annotations

import json

import pytest
import torch

from safedl import registry
from safedl.errors import ConfigError
from safedl.evaluate.base import AttackOutcome
from safedl.evaluate.context import RunContext
from safedl.evaluate.defend_evasion import evaluate_evasion_defense
from safedl.models import TrainRecipe, build_model, with_normalization
from safedl.profile import DefenseSpec, EvaluationSpec, Profile
from safedl.utils.tensors import predict, seed_everything

RECIPE = TrainRecipe(epochs=15, batch_size=64, lr=3e-3, augment="none")


def _fresh(splits):
    seed_everything(0)
    return with_normalization(build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8), splits.mean,
                              splits.std)


@pytest.fixture(scope="module")
def ensemble(digits_splits):
    trainer = registry.create("trainer", "model_ensemble", members=3)
    return trainer.fit(_fresh(digits_splits), digits_splits.train, recipe=RECIPE, seed=0)


def test_output_is_the_log_of_the_averaged_softmax(ensemble, eval_batch):
    x, _ = eval_batch
    with torch.no_grad():
        ref = torch.stack([m(x).softmax(1) for m in ensemble.members]).mean(0)
        out = ensemble(x)
        assert torch.allclose(out.exp(), ref, atol=1e-6)
        # the members differ (different initialisations and seeds)
        p0, p1 = (m(x).softmax(1) for m in list(ensemble.members)[:2])
    assert not torch.allclose(p0, p1, atol=1e-3)


def test_member_zero_is_the_baseline(ensemble, tiny_model, eval_batch):
    x, _ = eval_batch
    with torch.no_grad():
        assert torch.allclose(ensemble.members[0](x), tiny_model(x), atol=1e-5)


def test_adaptive_attack_on_the_whole_is_at_least_as_strong_as_transfer(ensemble, eval_batch):
    x, y = eval_batch
    pgd = registry.create("evasion", "pgd", eps=0.15, steps=20, seed=0)
    transfer = pgd(ensemble.members[1], x, y)  # crafted on one member
    adaptive = pgd(ensemble, x, y)  # gradients through the average
    acc_t = float((predict(ensemble, transfer) == y).float().mean())
    acc_a = float((predict(ensemble, adaptive) == y).float().mean())
    assert acc_a <= acc_t, (acc_a, acc_t)
    assert acc_a < float((predict(ensemble, x) == y).float().mean()) - 0.2


def test_architecture_loads_the_trained_weights(ensemble, digits_splits, eval_batch):
    x, _ = eval_batch
    rebuilt = registry.create("trainer", "model_ensemble", members=3).architecture(_fresh(digits_splits))
    rebuilt.load_state_dict(ensemble.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), ensemble(x))
    with pytest.raises(ConfigError, match="members"):
        registry.create("trainer", "model_ensemble", members=1)


def test_stage_attacks_the_ensemble_adaptively(tmp_path, digits_splits, tiny_model, eval_batch):
    profile = Profile(training=RECIPE, evaluation=EvaluationSpec(n_eval=64, batch_size=64))
    ctx = RunContext(profile=profile, splits=digits_splits, device=torch.device("cpu"), run_dir=tmp_path,
                     baseline=tiny_model, build_fresh=lambda: _fresh(digits_splits))
    x, y = eval_batch[0][:64], eval_batch[1][:64]
    spec = {"name": "pgd", "params": {"eps": 0.15, "steps": 10}, "targeted": False}
    x_adv = registry.create("evasion", "pgd", **spec["params"])(tiny_model, x, y)
    outcome = AttackOutcome(entry={"id": "pgd", "category": "evasion"},
                            state={"x": x, "y": y, "x_adv": x_adv, "target": None, "spec": spec})
    comp = registry.create("trainer", "model_ensemble", members=2)
    entry = evaluate_evasion_defense(ctx, DefenseSpec(name="model_ensemble", params={"members": 2}), [comp], outcome)
    json.dumps(entry)
    m = entry["metrics"]
    assert m["robust_accuracy_paired_adaptive"]["value"] <= m["robust_accuracy_nonadaptive"]["value"]
    assert m["members"]["value"] == 2
