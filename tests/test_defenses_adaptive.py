"""Evasion defenses, adaptive side: BPDA/EOT gradients, adaptive >= non-adaptive, and the attack conformance
contract when attacks run against a defended pipeline."""
from __future__ import annotations

import copy

import pytest
import torch

from _threat import assert_within_threat
from safedl import registry
from safedl.defenses.adaptive import strong_adaptive_suite, EOT, bpda, defended_model
from safedl.errors import ConfigError
from safedl.utils.tensors import predict

DEFENSE_KINDS = ("preprocessor", "postprocessor", "detector", "trainer", "certifier")


def test_bpda_identity_backward_and_real_forward():
    torch.manual_seed(0)
    fs = registry.create("preprocessor", "feature_squeezing", bit_depth=2)
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    w = torch.randn(4, 1, 8, 8)
    out = bpda(fs, None, x)
    assert torch.equal(out.detach(), fs(x.detach()))  # forward: the real preprocessor
    (g,) = torch.autograd.grad((out * w).sum(), x)
    assert torch.allclose(g, w)  # backward: identity
    # the real preprocessor alone masks the gradient (round has zero derivative)
    x2 = x.detach().clone().requires_grad_(True)
    (g2,) = torch.autograd.grad((fs(x2) * w).sum(), x2)
    assert float(g2.abs().sum()) == 0.0


def test_bpda_through_jpeg_approximation(eval_batch):
    x = eval_batch[0][:8]
    jpeg = registry.create("preprocessor", "jpeg_compression", quality=50)
    real, approx = jpeg(x), jpeg.approximation(x)
    # the differentiable JPEG stays close to the real codec (much closer than the codec's own distortion)
    assert float((real - approx).abs().mean()) < 0.5 * float((real - x).abs().mean())
    xg = x.clone().requires_grad_(True)
    out = bpda(jpeg, jpeg.approximation, xg)
    assert torch.allclose(out.detach(), real)
    (g,) = torch.autograd.grad(out.square().sum(), xg)
    assert float(g.abs().sum()) > 0


def test_defended_model_gradients_flow(tiny_model, eval_batch):
    x, y = eval_batch[0][:16], eval_batch[1][:16]
    pre = [registry.create("preprocessor", "feature_squeezing", bit_depth=3),
           registry.create("preprocessor", "jpeg_compression", quality=60)]
    for adaptive, expect_nonzero in ((True, True), (False, False)):
        m = defended_model(pre, tiny_model, adaptive=adaptive)
        xg = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(m(xg), y)
        (g,) = torch.autograd.grad(loss, xg, allow_unused=True)
        nonzero = g is not None and float(g.abs().sum()) > 0
        assert nonzero == expect_nonzero


def test_eot_averages_random_draws(tiny_model, eval_batch):
    x = eval_batch[0][:8]
    noise = registry.create("preprocessor", "gaussian_augmentation", sigma=0.2, seed=0)
    eot = EOT(torch.nn.Sequential(noise, tiny_model), samples=64)
    with torch.no_grad():
        a, b = eot(x).exp(), eot(x).exp()
    single = torch.nn.Sequential(noise, tiny_model)
    with torch.no_grad():
        s1, s2 = single(x).softmax(1), single(x).softmax(1)
    # the 64-draw average varies much less between calls than single draws do
    assert float((a - b).abs().mean()) < 0.5 * float((s1 - s2).abs().mean())
    assert torch.allclose(a.sum(1), torch.ones(8), atol=1e-5)


@pytest.mark.parametrize("name,params", [("feature_squeezing", {"bit_depth": 3}),
                                         ("spatial_smoothing", {"window": 2}),
                                         ("jpeg_compression", {"quality": 60})])
def test_adaptive_at_least_as_strong_as_nonadaptive(name, params, tiny_model, eval_batch):
    x, y = eval_batch
    pre = registry.create("preprocessor", name, **params)
    deployed = defended_model([pre], tiny_model, adaptive=False)
    attack = registry.create("evasion", "pgd", eps=0.2, steps=20, seed=0)
    x_na = attack(tiny_model, x, y)  # crafted on the undefended model
    # BPDA through the preprocessor's own approximation and with the identity; the attacker keeps, per sample, the
    # adaptive example that gets through (a smooth surrogate like JPEG's cubic rounding can have vanishing gradients)
    ok = torch.ones_like(y, dtype=torch.bool)
    for bpda_kind in ("approx", "identity"):
        x_ad = attack(defended_model([pre], tiny_model, adaptive=True, bpda=bpda_kind), x, y)
        ok &= predict(deployed, x_ad) == y
    # and the strong adaptive suite the handler adds (APGD-CE/DLR with restarts, every BPDA surrogate)
    ok &= strong_adaptive_suite(tiny_model, x, y, eps=0.2, preprocessors=[pre], steps=50, restarts=2, seed=0).robust
    acc_na = float((predict(deployed, x_na) == y).float().mean())
    acc_ad = float(ok.float().mean())
    # the adaptive attack alone (without the transferred examples) is at least as strong as the non-adaptive one
    assert acc_ad <= acc_na
    assert acc_ad < 0.3  # the defense alone does not stop an attacker who knows it


def _pipeline(kind: str):
    if kind == "preprocessors":
        return [registry.create("preprocessor", "spatial_smoothing", window=2),
                registry.create("preprocessor", "jpeg_compression", quality=70)], []
    return [registry.create("preprocessor", "gaussian_augmentation", sigma=0.05, seed=0)], \
        [registry.create("postprocessor", "rounding", decimals=2)]


WHITE_OR_SCORE = [n for n in registry.names("evasion") if not hasattr(registry.get("evasion", n), "fit")]


@pytest.mark.parametrize("pipeline", ["preprocessors", "random+post"])
@pytest.mark.parametrize("name", WHITE_OR_SCORE)
def test_conformance_against_defended_pipeline(name, pipeline, channels_case):
    _, tiny_model, x, y, _ = channels_case
    x, y = x[:16], y[:16]
    model = copy.deepcopy(tiny_model)
    model.train()
    first = next(model.parameters())
    first.grad = torch.full_like(first, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pre, post = _pipeline(pipeline)
    defended = defended_model(pre, model, post, adaptive=True, eot_samples=2)
    cls = registry.get("evasion", name)
    attack = registry.create("evasion", name, **dict(getattr(cls, "conformance_params", {})))
    x_adv = attack(defended, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert_within_threat(attack, x, x_adv)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(first.grad, torch.full_like(first, 0.5))
    assert all(p.grad is None for p in list(model.parameters())[1:])


BAD = {
    "feature_squeezing": {"bit_depth": 0}, "spatial_smoothing": {"window": 0}, "jpeg_compression": {"quality": 101},
    "total_variance_minimization": {"keep_prob": 1.5}, "gaussian_augmentation": {"sigma": -1.0},
    "reverse_sigmoid": {"beta": 0}, "rounding": {"decimals": -1}, "top_k": {"k": 0}, "gaussian_noise": {"scale": -0.1},
    "lid": {"k": 0}, "mahalanobis": {"fpr": 1.5}, "feature_squeezing_detector": {"bit_depth": 9},
    "frequency_statistics": {"cutoff": 0.0}, "adversarial_training": {"ratio": 1.5},
    "fast_adversarial_training": {"eps": -0.3}, "trades": {"beta": -1.0}, "randomized_smoothing": {"sigma": 0.0},
}


@pytest.mark.parametrize("name,bad", sorted(BAD.items()))
def test_invalid_params_raise_config_error(name, bad):
    kind = registry.find_kind(name, DEFENSE_KINDS)
    key = next(iter(bad))
    with pytest.raises(ConfigError, match=key):
        registry.create(kind, name, **bad)
    with pytest.raises(ConfigError, match="no parameter"):
        registry.create(kind, name, not_a_parameter=1)


def test_adversarial_training_choices_validated():
    with pytest.raises(ConfigError, match="attack"):
        registry.create("trainer", "adversarial_training", attack="cw")
    with pytest.raises(ConfigError, match="reference_size"):
        registry.create("detector", "lid", k=50, reference_size=20)


def test_adversarial_training_ratio_zero_is_plain_training_and_pgd_changes_it(digits_splits):
    from safedl.models import TrainRecipe, build_model, train_model, with_normalization
    from safedl.utils.tensors import seed_everything

    data = digits_splits.train.subset(torch.arange(192))
    recipe = TrainRecipe(epochs=1, batch_size=64, augment="none")

    def fresh():
        seed_everything(0)
        return with_normalization(build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8),
                                  digits_splits.mean, digits_splits.std)

    plain = fresh()
    train_model(plain, data, recipe=recipe, seed=0)
    clean_only = registry.create("trainer", "adversarial_training", ratio=0.0).fit(fresh(), data, recipe=recipe, seed=0)
    adv = registry.create("trainer", "adversarial_training", ratio=1.0, steps=2).fit(fresh(), data, recipe=recipe, seed=0)
    same = all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), clean_only.state_dict().values()))
    differs = any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), adv.state_dict().values()))
    assert same and differs and not adv.training


@pytest.mark.parametrize("name", ["adversarial_training", "trades", "fast_adversarial_training"])
def test_robust_trainers_epochs_override_only_the_passes(name, digits_splits):
    from safedl.models import TrainRecipe, build_model, with_normalization

    with pytest.raises(ConfigError, match="epochs"):
        registry.create("trainer", name, epochs=0)
    data = digits_splits.train.subset(torch.arange(64))
    recipe = TrainRecipe(epochs=1, batch_size=32, augment="none")
    model = with_normalization(build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8),
                               digits_splits.mean, digits_splits.std)
    params = {"steps": 1} if name != "fast_adversarial_training" else {}
    trainer = registry.create("trainer", name, epochs=3, **params)
    trainer.fit(model, data, recipe=recipe, seed=0)
    assert trainer.report_.epochs_run == 3 and recipe.epochs == 1  # the caller's recipe is not modified
    assert trainer.params()["epochs"] == 3
    assert registry.create("trainer", name).epochs is None  # default: the baseline recipe's epochs
