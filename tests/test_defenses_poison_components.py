"""Training-side defenses, STRIP and the inspectors on small planted cases."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from _poison_planted import TARGET, acc, fit, fresh, plant_backdoor, plant_flips, trigger
from safedl import registry
from safedl.data.dataset import Dataset
from safedl.models import TrainRecipe


def test_robust_loss_beats_cross_entropy_under_heavy_label_noise(digits_splits):
    noisy = plant_flips(digits_splits.train, 0.5)
    recipe = TrainRecipe(epochs=40, batch_size=64, lr=3e-3, augment="none", schedule="constant")
    ce = fresh(digits_splits)
    from safedl.models import train_model

    train_model(ce, noisy, recipe=recipe, seed=0)
    gce = registry.create("trainer", "robust_loss", loss="gce").fit(fresh(digits_splits), noisy, recipe=recipe, seed=0)
    a_ce, a_gce = acc(ce.eval(), digits_splits.test), acc(gce, digits_splits.test)
    assert a_gce > a_ce + 0.03, (a_gce, a_ce)


def test_robust_losses_match_their_formulas():
    logits = torch.randn(16, 5)
    y = torch.randint(0, 5, (16,))
    p_y = logits.softmax(1)[torch.arange(16), y]
    gce = registry.create("trainer", "robust_loss", loss="gce", q=0.7)
    assert torch.allclose(gce.loss_value(logits, y), ((1 - p_y**0.7) / 0.7).mean())
    sce = registry.create("trainer", "robust_loss", loss="symmetric_cross_entropy", alpha=0.1, beta=1.0)
    ce = nn.functional.cross_entropy(logits, y)
    assert torch.allclose(sce.loss_value(logits, y), 0.1 * ce + (4.0 * (1 - p_y)).mean())


def test_dp_training_reports_spent_epsilon_and_replaces_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3))
    data = Dataset(torch.rand(256, 1, 8, 8), torch.randint(0, 3, (256,)), 3)
    dp = registry.create("trainer", "dp_training", target_epsilon=3.0, target_delta=1e-5, max_grad_norm=1.0)
    out = dp.fit(model, data, recipe=TrainRecipe(epochs=2, batch_size=32), seed=0)
    assert math.isfinite(dp.epsilon_spent_) and 0 < dp.epsilon_spent_ <= 3.0 * 1.01
    assert dp.batchnorm_replaced_ and not any(isinstance(m, nn.BatchNorm2d) for m in out.modules())
    assert dp.noise_multiplier_ > 0
    # a tighter budget needs more noise
    dp2 = registry.create("trainer", "dp_training", target_epsilon=0.5)
    dp2.fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), data, recipe=TrainRecipe(epochs=2, batch_size=32), seed=0)
    assert dp2.noise_multiplier_ > dp.noise_multiplier_ and dp2.epsilon_spent_ <= 0.5 * 1.01


@pytest.fixture(scope="module")
def backdoored(digits_splits):
    return fit(digits_splits, plant_backdoor(digits_splits.train, 0.1))


def test_strip_flags_triggered_inputs_at_target_frr(backdoored, digits_splits):
    det = registry.create("detector", "strip", fpr=0.05).fit(digits_splits.val.x, model=backdoored, seed=0)
    xt = trigger(digits_splits.test.x[digits_splits.test.y != TARGET])
    tpr = float(det.predict(xt).float().mean())
    fpr = float(det.predict(digits_splits.test.x).float().mean())
    assert tpr >= 0.9 and fpr <= 0.12, (tpr, fpr)
    # higher score = more suspicious: triggered inputs have lower prediction entropy
    assert float(det.score(xt).median()) > float(det.score(digits_splits.test.x).median())


class _Swap(nn.Module):
    """Predicts class 5 whenever the wrapped model predicts 3."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        z = self.m(x)
        hit = z.argmax(1) == 3
        z = z.clone()
        z[hit, 5] = z[hit].max(1).values + 1
        return z


def test_per_class_monitoring_names_the_class_that_broke_against_the_reference(tiny_model, digits_splits):
    val = digits_splits.val
    pcm = registry.create("inspector", "per_class_monitoring")
    rep = pcm.inspect(_Swap(tiny_model), reference=tiny_model, data=val)
    assert rep["suspicious"] and rep["accuracy_dropped"] == [3] and 5 in rep["absorbing_classes"]
    assert rep["top_confusion"][3] == 5
    same = pcm.inspect(tiny_model, reference=tiny_model, data=val)
    assert not same["suspicious"] and same["flagged_classes"] == []


def test_model_inspection_flags_planted_large_weights_against_the_reference(tiny_model, digits_splits):
    import copy

    m = copy.deepcopy(tiny_model)
    insp = registry.create("inspector", "model_inspection")
    before = insp.inspect(m, reference=tiny_model, data=digits_splits.val)
    assert not before["suspicious"]
    other_seed = insp.inspect(fit(digits_splits, digits_splits.train, seed=1), reference=tiny_model,
                              data=digits_splits.val)
    assert not other_seed["suspicious"], other_seed["flagged_statistics"]  # no false alarm on a clean model
    name = [n for n, p in m.named_parameters() if n.endswith("weight") and p.ndim >= 2][1]
    with torch.no_grad():
        w = dict(m.named_parameters())[name]
        w.view(-1)[:3] = w.abs().max() * 30
    after = insp.inspect(m, reference=tiny_model, data=digits_splits.val)
    assert after["suspicious"] and f"{name}.max_over_std" in after["flagged_statistics"]
    assert name in after["histograms"]
