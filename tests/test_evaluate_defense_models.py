"""Models a defense trains are cached under a content key: a changed trainer is retrained on resume, and a model
whose architecture the trainer changes (DP-SGD's GroupNorm) reloads into the right layers with its epsilon."""
from __future__ import annotations

import torch

from safedl import registry
from safedl.evaluate.context import RunContext
from safedl.evaluate.defense_models import train_defense_model
from safedl.data import load_builtin, stratified_split
from safedl.models import build_model, with_normalization
from safedl.profile import Profile


def _ctx(tmp_path, arch: str = "tiny_cnn", **arch_params) -> RunContext:
    splits = stratified_split(load_builtin("digits"), test_fraction=0.2, val_fraction=0.1, seed=0)
    splits.train = splits.train.subset(torch.arange(300))
    profile = Profile.model_validate({"model": {"arch": arch, "params": arch_params},
                                      "training": {"epochs": 1, "batch_size": 64, "augment": "none",
                                                                   "schedule": "constant"}})

    def fresh():
        net = build_model(arch, in_channels=1, num_classes=10, image_size=8, **arch_params)
        return with_normalization(net, splits.mean, splits.std)

    return RunContext(profile=profile, splits=splits, device=torch.device("cpu"), run_dir=tmp_path,
                      baseline=fresh().eval(), build_fresh=fresh)


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_changed_trainer_params_are_retrained_not_reused(tmp_path):
    ctx = _ctx(tmp_path)
    make = lambda eps: registry.create("trainer", "adversarial_training", eps=eps, steps=1, epochs=1)  # noqa: E731
    first = train_defense_model(ctx, make(0.1))
    again = train_defense_model(ctx, make(0.1))
    assert not first.reloaded and again.reloaded
    assert torch.equal(_weights(first.model), _weights(again.model))
    changed = train_defense_model(ctx, make(0.3))
    assert not changed.reloaded  # before the content key, this silently reused the eps=0.1 model
    assert not torch.equal(_weights(changed.model), _weights(first.model))
    assert len(list((tmp_path / "stages" / "defense-models").iterdir())) == 2


def test_changed_recipe_is_retrained(tmp_path):
    ctx = _ctx(tmp_path)
    trainer = registry.create("trainer", "robust_loss", loss="gce")
    train_defense_model(ctx, trainer)
    ctx.profile.training.lr = ctx.profile.training.lr / 10
    assert not train_defense_model(ctx, trainer).reloaded


def test_dp_model_reloads_with_its_architecture_and_epsilon(tmp_path):
    ctx = _ctx(tmp_path, arch="resnet_small", width=4)
    dp = registry.create("trainer", "dp_training", target_epsilon=8.0, epochs=1)
    first = train_defense_model(ctx, dp, architecture=dp.architecture, facts=dp.facts)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in first.model.modules())
    # the plain trained module (Opacus' to_standard_module): no grad-sample hooks or per-sample gradients left
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in first.model.modules())
    assert not any(hasattr(p, "grad_sample") for p in first.model.parameters())
    assert 0 < first.facts["epsilon_spent"] <= 8.0 + 1e-6
    fresh = registry.create("trainer", "dp_training", target_epsilon=8.0, epochs=1)
    again = train_defense_model(ctx, fresh, architecture=fresh.architecture, facts=fresh.facts)
    assert again.reloaded and again.facts == first.facts
    x = ctx.splits.test.x[:32]
    assert torch.equal(first.model(x), again.model(x))


def test_onecycle_on_a_few_batches_trains_instead_of_crashing():
    from safedl.models import TrainRecipe, train_model

    splits = stratified_split(load_builtin("digits"), test_fraction=0.2, val_fraction=0.1, seed=0)
    for n in (64, 200, 300):  # 1, 4 and 5 optimizer steps: torch's OneCycleLR divided by zero on the last two
        model = with_normalization(build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8),
                                   splits.mean, splits.std)
        before = _weights(model).clone()
        train_model(model, splits.train.subset(torch.arange(n)), recipe=TrainRecipe(epochs=1, augment="none"), seed=0)
        assert not torch.equal(before, _weights(model))
