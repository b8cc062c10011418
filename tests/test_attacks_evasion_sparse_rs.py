"""Sparse-RS (Croce et al. 2022): the L0 budget holds exactly, and the random search beats random k-pixel noise."""
from __future__ import annotations

import pytest
import torch

from safedl import registry
from safedl.attacks.evasion.sparse_rs import changed_pixels, random_pixel_values, random_subset
from safedl.errors import ConfigError
from safedl.utils.tensors import predict


def _random_k_pixels(model, x, y, *, k: int, draws: int, seed: int) -> torch.Tensor:
    """The baseline with the same query budget: ``draws`` independent random k-pixel corner perturbations per
    image; an image counts as broken if any draw fools the model."""
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = x.shape
    broken = torch.zeros(n, dtype=torch.bool)
    for _ in range(draws):
        pos = random_subset(torch.ones(n, h * w, dtype=torch.bool), k, gen)
        adv = x.flatten(2).clone()
        adv.scatter_(2, pos.unsqueeze(1).expand(n, c, k), random_pixel_values(n, c, k, gen, x))
        broken |= predict(model, adv.view_as(x)) != y
    return broken


@pytest.mark.parametrize("k", [1, 4, 12])
def test_at_most_k_pixels_change(k, tiny_model, eval_batch):
    x, y = eval_batch
    attack = registry.create("evasion", "sparse_rs", k=k, max_queries=60, seed=3)
    x_adv = attack(tiny_model, x, y)
    changed = changed_pixels(x, x_adv)
    assert int(changed.max()) <= k
    assert int(changed.max()) >= 1  # it does perturb
    assert int(attack.queries_.max()) <= 60
    # changed pixels are set to corners of the colour cube
    moved = (x_adv - x).abs() > 1e-7
    assert bool(((x_adv[moved] == 0) | (x_adv[moved] == 1)).all())


def test_beats_random_k_pixels_with_the_same_queries(tiny_model, eval_batch):
    x, y = eval_batch
    ok = predict(tiny_model, x) == y
    x, y = x[ok], y[ok]
    k, q = 4, 100
    attack = registry.create("evasion", "sparse_rs", k=k, max_queries=q, seed=0)
    srs = predict(tiny_model, attack(tiny_model, x, y)) != y
    base = _random_k_pixels(tiny_model, x, y, k=k, draws=q, seed=0)
    n = len(y)
    # the search must break clearly more images than the best of q random draws with the same pixel budget
    assert float(srs.float().mean()) >= float(base.float().mean()) + 0.15, (int(srs.sum()), int(base.sum()), n)


def test_targeted_reaches_the_target_more_often_than_untargeted(tiny_model, eval_batch):
    x, y = eval_batch
    x, y = x[:64], y[:64]
    target = (y + 1) % 10
    targeted = registry.create("evasion", "sparse_rs", k=10, max_queries=150, seed=0)(tiny_model, x, y, target=target)
    plain = registry.create("evasion", "sparse_rs", k=10, max_queries=150, seed=0)(tiny_model, x, y)
    hit_t = (predict(tiny_model, targeted) == target).float().mean()
    hit_u = (predict(tiny_model, plain) == target).float().mean()
    assert float(hit_t) > float(hit_u)


def test_threat_is_a_pixel_budget_and_bad_k_is_refused():
    attack = registry.create("evasion", "sparse_rs", k=5)
    assert attack.norm == "l0" and attack.eps == 0.0
    assert attack.threat()["pixels"] == 5
    with pytest.raises(ConfigError, match="k"):
        registry.create("evasion", "sparse_rs", k=0)
    with pytest.raises(ConfigError, match="alpha_init"):
        registry.create("evasion", "sparse_rs", alpha_init=1.5)


def test_results_metrics_count_changed_pixels(tiny_model, eval_batch):
    from safedl.evaluate.attack_evasion import evasion_metrics

    x, y = eval_batch
    x, y = x[:32], y[:32]
    x_adv = registry.create("evasion", "sparse_rs", k=3, max_queries=30, seed=0)(tiny_model, x, y)
    m = evasion_metrics(tiny_model, x, y, x_adv, target=None, queries=None)
    assert m["perturbation"]["l0_max"]["value"] <= 3
    assert m["perturbation"]["l0_mean"]["value"] == pytest.approx(float(changed_pixels(x, x_adv).float().mean()))
