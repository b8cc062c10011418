"""Evasion defenses, component side: detector calibration and adaptive evasion, randomized smoothing consistency,
postprocessor guarantees, and the defend_evasion stage handler on a layered pipeline."""
from __future__ import annotations

import json
import math

import pytest
import torch
from scipy.stats import norm
from torch import nn

from safedl import registry
from safedl.evaluate.context import RunContext
from safedl.evaluate.defend_evasion import evaluate_evasion_defense
from safedl.evaluate.base import AttackOutcome
from safedl.run.handlers import get_defense_handler
from safedl.defenses.adaptive import DetectorAwarePGD
from safedl.utils.stats import auroc
from safedl.models import TrainRecipe, build_model, with_normalization
from safedl.profile import ComponentSpec, DefenseSpec, EvaluationSpec, Profile
from safedl.utils.tensors import predict


@pytest.fixture(scope="module")
def pgd_batch(tiny_model, eval_batch):
    x, y = eval_batch
    return registry.create("evasion", "pgd", eps=0.3, steps=10, seed=0)(tiny_model, x, y)


@pytest.fixture(scope="module")
def fitted(tiny_model, digits_splits):
    out = {}
    for name in registry.names("detector"):
        extra = {"max_fit": 300} if name == "lid" else {}
        out[name] = registry.create("detector", name, fpr=0.05, **extra).fit(digits_splits.train.x, model=tiny_model,
                                                                  y=digits_splits.train.y, seed=0)
    return out


@pytest.mark.parametrize("name", registry.names("detector"))
def test_detector_threshold_calibrated_for_target_fpr(name, fitted, digits_splits):
    det = fitted[name]
    x = digits_splits.test.x  # clean images never seen in fit or calibration
    fpr = float(det.predict(x).float().mean())
    se = math.sqrt(0.05 * 0.95 / len(x))
    assert abs(fpr - 0.05) < 4 * se + 0.02, fpr
    # a lower target FPR gives a higher threshold and fewer clean flags
    t1 = det.threshold_at(0.01)
    assert t1 >= det.threshold_
    assert float((det.score(x) > t1).float().mean()) <= fpr


@pytest.mark.parametrize("name", ["lid", "mahalanobis"])
def test_feature_detectors_separate_pgd_and_adaptive_attack_evades(name, fitted, tiny_model, eval_batch, pgd_batch):
    x, y = eval_batch
    det = fitted[name]
    assert auroc(det.score(x), det.score(pgd_batch)) > 0.75
    tpr_na = float(det.predict(pgd_batch).float().mean())
    x_ad = DetectorAwarePGD(eps=0.3, steps=20, seed=0)(tiny_model, [det], x, y)
    fooled = predict(tiny_model, x_ad) != y
    evaded = fooled & ~det.predict(x_ad)
    # the adaptive attack still fools the classifier and is flagged far less often than non-adaptive PGD
    assert float(evaded.float().mean()) > 0.5
    assert float(det.predict(x_ad).float().mean()) < tpr_na
    assert float((x_ad - x).abs().max()) <= 0.3 + 1e-6


class _Const(nn.Module):
    def __init__(self, cls: int, k: int = 10):
        super().__init__()
        self.cls, self.k = cls, k
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return nn.functional.one_hot(torch.full((len(x),), self.cls), self.k).float() + 0 * self.dummy


class _Coin(nn.Module):
    """Class 0 or 1 depending on the sign of the (noisy) first pixel around 0.5: a fair coin under heavy noise."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        c = (x.flatten(1)[:, 0] > 0.5).long()
        return nn.functional.one_hot(c, 10).float() + 0 * self.dummy


def test_smoothing_certifies_a_constant_classifier_at_its_maximum_radius():
    rs = registry.create("certifier", "randomized_smoothing", sigma=0.5, n0=10, n=200, alpha=0.001).with_model(_Const(3))
    label, radius = rs.certify(torch.rand(5, 1, 8, 8))
    assert (label == 3).all()
    # every one of n samples votes for class 3: pA_lower = alpha^(1/n), radius = sigma * Phi^-1(pA_lower)
    expected = 0.5 * norm.ppf(0.001 ** (1 / 200))
    assert torch.allclose(radius, torch.full((5,), expected), atol=1e-4)
    assert (rs.predict(torch.rand(5, 1, 8, 8)) == 3).all()


def test_smoothing_abstains_on_a_coin_flip():
    rs = registry.create("certifier", "randomized_smoothing", sigma=2.0, n0=20, n=400).with_model(_Coin())
    x = torch.full((6, 1, 8, 8), 0.5)
    label, radius = rs.certify(x)
    assert (label == -1).all() and (radius == 0).all()
    assert (rs.predict(x) == -1).all()


def test_smoothing_consistent_on_real_model(tiny_model, eval_batch):
    x, y = eval_batch[0][:32], eval_batch[1][:32]
    rs = registry.create("certifier", "randomized_smoothing", sigma=0.25, n0=20, n=200, seed=0).with_model(tiny_model)
    label, radius = rs.certify(x)
    assert ((label == -1) == (radius == 0)).all()
    assert float(radius.max()) <= 0.25 * norm.ppf(0.001 ** (1 / 200)) + 1e-5
    acc = rs.certified_accuracy(x, y, [0.0, 0.1, 0.3])
    assert acc[0.0][0] > 0.6 * len(y)
    # the certificate holds: inside half its radius, the smoothed prediction never changes to another class
    g = torch.Generator().manual_seed(1)
    sure = (label >= 0) & (radius > 0.05)
    delta = torch.randn(x[sure].shape, generator=g)
    delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * (0.5 * radius[sure]).view(-1, 1, 1, 1)
    moved = rs.predict(x[sure] + delta)
    assert int(sure.sum()) >= 8 and bool(((moved == label[sure]) | (moved == -1)).all())
    # deterministic under the seed
    assert torch.equal(rs.certify(x)[0], label)


@pytest.mark.parametrize("name", registry.names("postprocessor"))
def test_postprocessors_scores_and_argmax(name):
    torch.manual_seed(0)
    logits = torch.randn(200, 10) * 3
    post = registry.create("postprocessor", name)
    s = post(logits)
    assert s.shape == logits.shape and float(s.min()) >= 0
    if post.preserves_argmax:
        assert torch.equal(s.argmax(1), logits.argmax(1))
    if name in ("class_labels", "top_k"):
        assert int((s > 0).sum(1).max()) == 1  # labels / top-1 only: no other information leaks


def test_rounding_and_labels_hide_score_information():
    logits = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.001, 0.0]])
    r = registry.create("postprocessor", "rounding", decimals=1)(logits)
    assert torch.equal(r[0], r[1])  # a tiny logit change is invisible after rounding
    assert torch.equal(registry.create("postprocessor", "class_labels")(logits)[0], torch.tensor([1.0, 0, 0]))


def _ctx(tmp_path, digits_splits, tiny_model):
    profile = Profile(training=TrainRecipe(epochs=2, batch_size=64, lr=3e-3, augment="none"),
                      evaluation=EvaluationSpec(n_eval=64, batch_size=64))

    def fresh():
        return with_normalization(build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8),
                                  digits_splits.mean, digits_splits.std)

    return RunContext(profile=profile, splits=digits_splits, device=torch.device("cpu"), run_dir=tmp_path,
                      baseline=tiny_model, build_fresh=fresh)


def _outcome(tiny_model, eval_batch, n=64):
    x, y = eval_batch[0][:n], eval_batch[1][:n]
    spec = {"name": "pgd", "params": {"eps": 0.3, "steps": 10}, "targeted": False}
    x_adv = registry.create("evasion", "pgd", **spec["params"])(tiny_model, x, y)
    return AttackOutcome(entry={"id": "pgd", "category": "evasion"},
                         state={"x": x, "y": y, "x_adv": x_adv, "target": None, "spec": spec})


def test_handler_layered_pipeline(tmp_path, digits_splits, tiny_model, eval_batch):
    assert get_defense_handler("pipeline", "evasion") is evaluate_evasion_defense
    spec = DefenseSpec(pipeline=[ComponentSpec(name="spatial_smoothing", params={"window": 2}),
                                 ComponentSpec(name="mahalanobis"),
                                 ComponentSpec(name="fast_adversarial_training", params={"eps": 0.3})])
    components = [registry.create(k, c.name, **c.params) for k, c in
                  zip(("preprocessor", "detector", "trainer"), spec.pipeline)]
    ctx = _ctx(tmp_path, digits_splits, tiny_model)
    entry = evaluate_evasion_defense(ctx, spec, components, _outcome(tiny_model, eval_batch, n=32))
    m = entry["metrics"]
    json.dumps(entry)  # serialisable
    for key in ("clean_accuracy", "robust_accuracy", "robust_accuracy_nonadaptive", "latency_added_ms_per_image",
                "training_time_s", "detection", "detection_adaptive"):
        assert key in m, key
    for key in ("tpr_at_fpr_1pct", "tpr_at_fpr_5pct", "auroc"):
        assert key in m["detection"]
    assert m["robust_accuracy"]["value"] <= m["robust_accuracy_nonadaptive"]["value"]
    assert m["robust_accuracy"]["n"] == 32
    assert any("ADAPTIVE" in s for s in entry["notes"])
    for rel in entry["artifacts"].values():
        assert (tmp_path / rel).exists()
    # the trained model is kept in the stage folder, so another attack against this defense reloads it
    assert list(tmp_path.glob("stages/defense-models/*/model.pt"))


def test_handler_randomized_smoothing(tmp_path, digits_splits, tiny_model, eval_batch):
    spec = DefenseSpec(name="randomized_smoothing", params={"sigma": 0.25, "n0": 10, "n": 100})
    comp = registry.create("certifier", "randomized_smoothing", **spec.params)
    entry = evaluate_evasion_defense(_ctx(tmp_path, digits_splits, tiny_model), spec, [comp],
                                     _outcome(tiny_model, eval_batch, n=32))
    cert = entry["metrics"]["certified_accuracy"]
    vals = [cert[k]["value"] for k in sorted(cert, key=lambda k: float(k.split("_")[1]))]
    assert vals == sorted(vals, reverse=True)
    assert "robust_accuracy" in entry["metrics"] and "clean_rejection_rate" in entry["metrics"]


def test_lid_mle_matches_the_formula_and_orders_dimensions():
    from safedl.defenses.detect.lid import lid_mle

    g = torch.Generator().manual_seed(0)
    a, ref, k = torch.randn(5, 7, generator=g), torch.randn(40, 7, generator=g), 10
    got = lid_mle(a, ref, k)
    for i in range(5):  # slow reference: -(1/k sum log(r_i / r_k))^-1 over the k nearest distances
        r = sorted(math.dist(a[i].tolist(), ref[j].tolist()) for j in range(40))[:k]
        assert float(got[i]) == pytest.approx(-1 / (sum(math.log(v / r[-1]) for v in r) / k), rel=1e-4)
    # points on a 2-d plane inside 10-d space have a much lower estimated LID than a full 10-d cloud
    plane = torch.randn(600, 2, generator=g) @ torch.randn(2, 10, generator=g)
    cloud = torch.randn(600, 10, generator=g)
    lid_plane = lid_mle(plane[:100], plane[100:], 20).median()
    lid_cloud = lid_mle(cloud[:100], cloud[100:], 20).median()
    assert 1.0 < lid_plane < 3.5 < 6.0 < lid_cloud


def test_layer_outputs_relu_and_all_layers(tiny_model, eval_batch):
    from safedl.defenses.detect._base import layer_outputs

    x = eval_batch[0][:4]
    relu = layer_outputs(tiny_model, x, pool=True)
    assert [a.shape[1] for a in relu] == [8, 16, 32, 10]  # per-channel means of two conv ReLUs, hidden ReLU, logits
    every = layer_outputs(tiny_model, x, pool=False, layers="all")
    # conv, relu, conv, relu, pool, linear, relu (flatten and Normalize skipped), then the logits once
    assert len(every) == 8 and torch.equal(every[-1], tiny_model(x))
    assert every[1].shape[1] == 8 * 8 * 8


def test_mahalanobis_distances_match_a_slow_reference(fitted, digits_splits):
    from safedl.defenses.detect.mahalanobis import _features

    det = fitted["mahalanobis"]
    x = digits_splits.test.x[:5]
    with torch.no_grad():
        feats = _features(det.model_, x)
        got = det._closest(feats)
    assert len(got) == len(det.means_) == 3  # one Gaussian model per ReLU layer (the feature ensemble)
    for f, mu, prec, d in zip(feats, det.means_, det.precisions_, got):
        for i in range(len(x)):
            ref = min(float((f[i] - mu[c]) @ prec @ (f[i] - mu[c])) for c in range(len(mu)))
            assert float(d[i]) == pytest.approx(ref, rel=1e-3, abs=1e-3)


def test_supervised_detectors_validate_and_use_their_fit_attack(tiny_model, digits_splits, eval_batch, pgd_batch):
    from safedl.errors import ConfigError, UnknownComponentError

    with pytest.raises(UnknownComponentError, match="fgsm"):
        registry.create("detector", "lid", attack="not_an_attack")
    with pytest.raises(ConfigError, match="attack_params"):
        registry.create("detector", "mahalanobis", attack_params={"eps": 0.1})  # the budget is the detector's eps
    with pytest.raises(ConfigError, match="attack_params"):
        registry.create("detector", "mahalanobis", attack="fgsm", attack_params={"steps": 3})
    x, _ = eval_batch
    det = registry.create("detector", "mahalanobis", attack="fgsm", noise_magnitude=0.01).fit(
        digits_splits.train.x, model=tiny_model, y=digits_splits.train.y, seed=0)
    assert det.attack == "fgsm" and det.fit_accuracy_ > 0.8
    # fitted on FGSM examples, tested on PGD: a cross-attack number
    assert auroc(det.score(x), det.score(pgd_batch)) > 0.75
    # the input-preprocessed score stays differentiable for adaptive attacks (identity gradient through the step)
    xg = x[:8].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(det.score_torch(xg).sum(), xg)
    assert float(grad.abs().sum()) > 0


@pytest.mark.parametrize("name", registry.names("detector"))
def test_detector_used_before_fit_raises_not_fitted(name, eval_batch):
    """score/predict before fit: one clear NotFittedError naming the detector (not a bare AttributeError)."""
    from safedl.errors import NotFittedError

    det = registry.create("detector", name)
    x, _ = eval_batch
    for use in (det.score, det.predict):
        with pytest.raises(NotFittedError, match=rf"{type(det).__name__} is not fitted yet .*call fit\(x_clean"):
            use(x[:4])
