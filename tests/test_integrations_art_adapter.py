"""The ART adapter (``art:ClassName`` components): registry resolution, parameter errors, the [0, 1] / eps-ball
contract, counted queries for black-box ART attacks, ART preprocessors/postprocessors as pipeline components, and
safedl working without ART."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from safedl import registry
from safedl.errors import AttackContractError, ConfigError, UnknownComponentError
from safedl.utils.tensors import predict

pytest.importorskip("art")


def test_art_names_resolve_to_registered_components_of_the_right_kind():
    assert registry.find_kind("art:SpatialSmoothing", registry.DEFENSE_KINDS) == "preprocessor"
    assert registry.find_kind("art:ReverseSigmoid", registry.DEFENSE_KINDS) == "postprocessor"
    pgd = registry.create("evasion", "art:ProjectedGradientDescent", eps=0.1, max_iter=5)
    assert pgd.access == "white-box" and pgd.bounded and pgd.eps == 0.1 and pgd.norm == "linf"
    assert registry.create("evasion", "art:SquareAttack", eps=0.1).access == "scores"
    assert registry.create("postprocessor", "art:ClassLabels").preserves_argmax is False  # ART 1.20.1 batch bug
    assert not registry.create("evasion", "art:DeepFool").bounded
    # the bundle round trip: non-default arguments read back and rebuilt
    params = registry.creation_params(pgd)
    assert params == {"eps": 0.1, "max_iter": 5, "norm": "linf"}
    assert registry.creation_params(registry.create("evasion", "art:ProjectedGradientDescent", **params)) == params


@pytest.mark.parametrize("kind,name,params,needle", [
    ("evasion", "art:NoSuchAttack", {}, "art:ProjectedGradientDescent"),
    ("evasion", "art:ProjectedGradientDescent", {"epsilon": 0.1}, "its parameters are"),
    ("evasion", "art:ProjectedGradientDescent", {"max_iter": -3}, "max_iter"),
    ("evasion", "art:ProjectedGradientDescent", {"norm": 1}, "allowed: 'linf'"),
    ("evasion", "art:ProjectedGradientDescent", {"eps": 2.0}, "pixel range"),
    ("evasion", "art:FastGradientMethod", {"on_violation": "ignore"}, "on_violation"),
    ("preprocessor", "art:SpatialSmoothing", {"window_size": 0}, "window_size"),
    ("preprocessor", "art:NoSuchDefence", {}, "art:SpatialSmoothing"),
])
def test_bad_art_names_and_params_are_one_clear_user_error(kind, name, params, needle):
    with pytest.raises((ConfigError, UnknownComponentError)) as exc:
        registry.create(kind, name, **params)
    assert needle in str(exc.value)


def test_art_pgd_equals_native_pgd_without_random_start(tiny_model, eval_batch):
    x, y = eval_batch
    theirs = registry.create("evasion", "art:ProjectedGradientDescent", eps=0.1, eps_step=0.01, max_iter=20,
                             batch_size=len(x))(tiny_model, x, y)
    ours = registry.create("evasion", "pgd", eps=0.1, alpha=0.01, steps=20, random_start=False)(tiny_model, x, y)
    np.testing.assert_allclose(theirs.numpy(), ours.numpy(), atol=1e-5)


def test_targeted_art_attack_aims_at_the_target(tiny_model, eval_batch):
    x, y = eval_batch
    target = (y + 1) % 10
    x_adv = registry.create("evasion", "art:ProjectedGradientDescent", eps=0.3, eps_step=0.03, max_iter=20)(
        tiny_model, x, y, target=target)
    assert float((predict(tiny_model, x_adv) == target).float().mean()) > 0.5


class _Escaping:
    """An ART-like attack that ignores its budget: returns x + 0.5 (outside both the eps-ball and [0, 1])."""

    def __init__(self, estimator, **kw):
        pass

    def generate(self, x, y=None):
        return x + 0.5


def test_outputs_outside_the_eps_ball_or_pixel_range_are_refused_or_projected(tiny_model, eval_batch, monkeypatch):
    x, y = eval_batch[0][:8], eval_batch[1][:8]
    attack = registry.create("evasion", "art:FastGradientMethod", eps=0.05)
    monkeypatch.setattr(type(attack), "art_class", _Escaping)
    with pytest.raises(AttackContractError, match="eps-ball"):
        attack(tiny_model, x, y)
    flagged = registry.create("evasion", "art:FastGradientMethod", eps=0.05, on_violation="project")
    monkeypatch.setattr(type(flagged), "art_class", _Escaping)
    x_adv = flagged(tiny_model, x, y)
    assert flagged.eps_violations_ == 8
    assert float((x_adv - x).abs().max()) <= 0.05 + 1e-6 and 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1


def test_black_box_art_attack_is_counted_per_sample_through_the_query_interface(tiny_model, eval_batch):
    x, y = eval_batch[0][:6], eval_batch[1][:6]
    attack = registry.create("evasion", "art:SquareAttack", eps=0.2, max_iter=20, nb_restarts=1)
    calls = []
    hook = tiny_model.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    try:
        x_adv = attack(tiny_model, x, y)
    finally:
        hook.remove()
    q = attack.queries_
    assert q.shape == (6,) and bool((q > 0).all())
    # every forward of the model (less the one class-count probe per batch) is a counted query
    assert int(q.sum()) == sum(calls) - 1
    assert float((x_adv - x).abs().amax()) <= 0.2 + 1e-5


def test_art_preprocessor_matches_art_and_is_bpda_in_adaptive_attacks(eval_batch):
    from art.defences.preprocessor import FeatureSqueezing

    from safedl.defenses.adaptive import BPDA, defended_model

    x = eval_batch[0][:16]
    pre = registry.create("preprocessor", "art:FeatureSqueezing", bit_depth=2)
    theirs, _ = FeatureSqueezing(clip_values=(0, 1), bit_depth=2)(x.numpy())
    np.testing.assert_allclose(pre(x).numpy(), theirs, atol=1e-6)
    native = registry.create("preprocessor", "feature_squeezing", bit_depth=2)
    np.testing.assert_allclose(pre(x).numpy(), native(x).numpy(), atol=1e-6)
    assert pre.differentiable is False
    surface = defended_model([pre], torch.nn.Flatten(), adaptive=True)
    assert isinstance(surface.inner[0], BPDA)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(surface(xg).sum(), xg)
    assert torch.equal(g, torch.ones_like(g))  # identity backward through ART's numpy code


def test_art_postprocessor_turns_logits_into_art_scores():
    from art.defences.postprocessor import Rounded

    logits = torch.tensor([[2.0, 1.0, -1.0], [0.1, 0.2, 0.3]])
    post = registry.create("postprocessor", "art:Rounded", decimals=1)
    expected = Rounded(decimals=1)(logits.softmax(1).numpy())
    np.testing.assert_allclose(post(logits).numpy(), expected, atol=1e-6)


def test_safedl_imports_and_names_art_clearly_without_art(tmp_path):
    """With ART unimportable, safedl and its registry still work; an art: name is one clear ConfigError."""
    code = (
        "import sys; sys.modules['art'] = None\n"
        "from safedl import registry\n"
        "from safedl.errors import ConfigError\n"
        "assert 'pgd' in registry.names('evasion')\n"
        "try:\n    registry.create('evasion', 'art:ProjectedGradientDescent')\n"
        "except ConfigError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": "src", "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "pip install 'safedl[art]'" in out.stdout


def test_art_backdoor_poisons_with_exact_ground_truth_and_arts_own_trigger(digits_splits):
    from art.attacks.poisoning.perturbations import add_pattern_bd

    train = digits_splits.train
    attack = registry.create("backdoor", "art:PoisoningAttackBackdoor", perturbation="add_pattern_bd",
                             perturbation_params={"distance": 1}, target_class=3, poison_fraction=0.05)
    p = attack.poison(train, generator=torch.Generator().manual_seed(0))
    idx = torch.nonzero(p.is_poison).flatten()
    assert len(idx) == round(0.05 * len(train))
    assert bool((p.y[idx] == 3).all()) and bool((p.original_y[idx] != 3).all())
    assert torch.equal(p.x[~p.is_poison], train.x[~p.is_poison]) and torch.equal(p.original_x, train.x)
    nhwc = train.x[idx].permute(0, 2, 3, 1).numpy()
    expected = torch.as_tensor(add_pattern_bd(nhwc, distance=1)).permute(0, 3, 1, 2)
    assert torch.equal(p.x[idx], expected)
    assert torch.equal(attack.apply_trigger(train.x[:4]), attack.apply_trigger(train.x[:4]))


@pytest.mark.parametrize("kind,name,params,needle", [
    ("backdoor", "art:PoisoningAttackBackdoor", {"perturbation": "add_noise"}, "add_pattern_bd"),
    ("backdoor", "art:PoisoningAttackBackdoor", {"perturbation_params": {"size": 3}}, "allowed: distance"),
    ("backdoor", "art:PoisoningAttackBackdoor", {"perturbation_params": {"pixel_value": 3}}, "[0, 1]"),
    ("poisoning", "art:PoisoningAttackBackdoor", {}, "backdoor"),
    ("backdoor", "art:HiddenTriggerBackdoor", {}, "art:PoisoningAttackBackdoor"),
])
def test_bad_art_backdoor_entries_are_one_clear_user_error(kind, name, params, needle):
    with pytest.raises((ConfigError, UnknownComponentError)) as exc:
        registry.create(kind, name, **params)
    assert needle in str(exc.value)


def test_decision_based_art_attack_gets_labels_only_and_every_query_is_counted(tiny_model, eval_batch):
    x, y = eval_batch[0][:3], eval_batch[1][:3]
    attack = registry.create("evasion", "art:HopSkipJump", max_iter=2, max_eval=20, init_eval=5)
    assert attack.access == "labels" and not attack.bounded
    seen = []
    hook = tiny_model.register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
    try:
        x_adv = attack(tiny_model, x, y)  # ART queries batches of rows (float64): each row counts for its sample
    finally:
        hook.remove()
    assert int(attack.queries_.sum()) == sum(seen) - 1 and bool((attack.queries_ > 0).all())
    assert 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1


def test_an_art_attack_that_returns_no_adversarial_images_is_refused(tiny_model, eval_batch, monkeypatch):
    class _Patch:
        def __init__(self, estimator, **kw):
            pass

        def generate(self, x, y=None):
            return np.zeros((3, 3)), np.ones((3, 3))

    attack = registry.create("evasion", "art:FastGradientMethod", eps=0.05)
    monkeypatch.setattr(type(attack), "art_class", _Patch)
    with pytest.raises(AttackContractError, match="shape"):
        attack(tiny_model, eval_batch[0][:4], eval_batch[1][:4])


def test_a_profile_with_bad_art_entries_exits_2_naming_each_key(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from safedl.cli import app
    from _profiles import tiny_profile

    prof = tiny_profile(attacks={"evasion": [{"name": "art:ProjectedGradientDescent", "params": {"max_iter": -1}},
                                             {"name": "art:NoSuch"}]},
                        defenses=[{"name": "art:SpatialSmoothing", "params": {"window": 3}}])
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(prof))
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 2
    out = " ".join(res.output.split())
    for needle in ("attacks.evasion[0].params", "max_iter", "attacks.evasion[1].name", "art:ProjectedGradientDescent",
                   "defenses[0].params", "window_size"):
        assert needle in out, needle


ART_CONFORMANCE = [("art:ProjectedGradientDescent", {"eps": 0.1, "max_iter": 5, "num_random_init": 1}),
                   ("art:FastGradientMethod", {"eps": 0.1}),
                   ("art:SquareAttack", {"eps": 0.2, "max_iter": 10})]


@pytest.mark.parametrize("name,params", ART_CONFORMANCE)
def test_art_attacks_keep_safedls_attack_contract(name, params, tiny_model, eval_batch):
    """The conformance checks of tests/test_attacks_conformance.py for the adapter: shape, dtype, [0, 1], eps-ball,
    determinism under the seed, and the model's parameters, .grad and train mode left as they were."""
    import copy

    x, y = eval_batch[0][:16], eval_batch[1][:16]
    a = registry.create("evasion", name, **params)(tiny_model, x, y)
    b = registry.create("evasion", name, **params)(tiny_model, x, y)
    assert a.shape == x.shape and a.dtype == x.dtype and not a.requires_grad and torch.equal(a, b)
    assert 0 <= float(a.min()) and float(a.max()) <= 1 and float((a - x).abs().max()) <= params["eps"] + 1e-5
    model = copy.deepcopy(tiny_model).train()
    first = next(model.parameters())
    first.grad = torch.full_like(first, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    registry.create("evasion", name, **params)(model, x, y)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(first.grad, torch.full_like(first, 0.5))
    assert all(p.grad is None for p in list(model.parameters())[1:]) and all(p.requires_grad for p in model.parameters())
