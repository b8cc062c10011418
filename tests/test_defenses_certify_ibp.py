"""Interval bound propagation: sound bounds, verified accuracy never above PGD robust accuracy, IBP training that
raises verified accuracy over standard training, and a clear refusal of layers IBP cannot bound."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from safedl import registry
from safedl.defenses.certify.interval_bounds import interval_bounds, margin_lower_bounds
from safedl.errors import ConfigError
from safedl.models import Normalize, TrainRecipe, build_model, train_model, with_normalization
from safedl.utils.tensors import predict, seed_everything

EPS = 0.05
RECIPE = TrainRecipe(epochs=15, batch_size=64, lr=3e-3, augment="none")  # conftest's tiny_model recipe


def _ball(x: torch.Tensor, eps: float, k: int, seed: int) -> torch.Tensor:
    """``k`` random points of the L-inf ball around each image, inside [0, 1] (corners included)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand((k,) + x.shape, generator=g) * 2 - 1
    u[: k // 2] = u[: k // 2].sign()  # half of them on the corners, where bounds are tightest to reach
    return (x.unsqueeze(0) + eps * u).clamp(0, 1)


def _bn_pool_net() -> nn.Module:
    """A random network with every supported layer kind (batch norm in eval mode with non-trivial statistics)."""
    seed_everything(1)
    net = nn.Sequential(Normalize([0.5], [0.3]), nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Dropout(0.2), nn.Linear(24, 16), nn.ReLU(), nn.Identity(), nn.Linear(16, 10))
    bn = net[2]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(-1.5, 1.5)  # negative scales too
    return net.eval()


@pytest.mark.parametrize("which", ["tiny_model", "bn_pool"])
def test_bounds_contain_the_outputs_of_random_points_in_the_ball(which, tiny_model, eval_batch):
    model = tiny_model if which == "tiny_model" else _bn_pool_net()
    x, y = eval_batch[0][:32], eval_batch[1][:32]
    lo, hi = interval_bounds(model, x, EPS)
    margins = margin_lower_bounds(model, x, y, EPS)
    with torch.no_grad():
        for pts in _ball(x, EPS, 16, seed=0):
            z = model(pts)
            assert bool((z >= lo - 1e-5).all() and (z <= hi + 1e-5).all())
            true_margin = z.gather(1, y.view(-1, 1)) - z
            assert bool((true_margin >= margins - 1e-5).all())
    assert bool((lo <= hi).all()) and float((hi - lo).mean()) > 0
    # eps 0 gives the exact output
    lo0, hi0 = interval_bounds(model, x, 0.0)
    with torch.no_grad():
        assert torch.allclose(lo0, model(x), atol=1e-5) and torch.allclose(hi0, model(x), atol=1e-5)


def _pgd_robust(model, x, y, eps):
    pgd = registry.create("evasion", "pgd", eps=eps, steps=20, seed=0)
    return predict(model, pgd(model, x, y)) == y


def _ibp_model(digits_splits, *, eps):
    seed_everything(0)
    model = with_normalization(build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8),
                               digits_splits.mean, digits_splits.std)
    trainer = registry.create("trainer", "ibp", eps=eps, eps_ramp=0.5)
    return trainer.fit(model, digits_splits.train, recipe=RECIPE, seed=0)


def test_ibp_training_raises_verified_accuracy_and_verified_never_exceeds_pgd(digits_splits, tiny_model):
    test = digits_splits.test
    x, y = test.x[:200], test.y[:200]
    ibp_model = _ibp_model(digits_splits, eps=1.1 * EPS)
    cert = registry.create("certifier", "ibp", eps=EPS)
    results = {}
    for name, model in (("standard", tiny_model), ("ibp", ibp_model)):
        ok = cert.with_model(model).certify(x, y)
        robust = _pgd_robust(model, x, y, EPS)
        # sound: a verified input is never broken by PGD (so verified accuracy <= PGD robust accuracy)
        assert not bool((ok & ~robust).any())
        assert bool((predict(model, x)[ok] == y[ok]).all())
        results[name] = float(ok.float().mean())
    assert results["ibp"] >= results["standard"] + 0.3, results
    counts = cert.with_model(ibp_model).certified_accuracy(x, y, [0.0, EPS, 0.2])
    assert counts[0.0][0] >= counts[EPS][0] >= counts[0.2][0] and counts[EPS] == (int(results["ibp"] * 200), 200)


def test_certifier_refuses_a_layer_it_cannot_bound(digits_splits):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Sigmoid())
    with pytest.raises(ConfigError, match=r"layer '2' is a Sigmoid.*supported: Linear"):
        registry.create("certifier", "ibp").with_model(model)
    resnet = build_model("resnet_small", in_channels=1, num_classes=10, image_size=8)
    with pytest.raises(ConfigError, match="is a ResNetSmall"):
        registry.create("trainer", "ibp").fit(resnet, digits_splits.train, recipe=RECIPE, seed=0)


def test_kappa_and_eps_follow_the_ramp():
    from safedl.defenses.train.adversarial_training import EpsSchedule

    trainer = registry.create("trainer", "ibp", eps=0.2, eps_ramp=0.5, kappa_start=1.0, kappa_end=0.5)
    sched = EpsSchedule(trainer.eps, trainer.eps_ramp, total_steps=100)
    seen = [(sched.next(), trainer.kappa(sched)) for _ in range(100)]
    assert seen[0] == pytest.approx((0.2 / 50, 1.0 - 0.5 / 50))
    assert seen[24] == pytest.approx((0.1, 0.75)) and seen[-1] == pytest.approx((0.2, 0.5))
