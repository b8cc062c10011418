"""FGSM and PGD behaviour beyond the conformance suite."""
from __future__ import annotations

import torch

from safedl import registry
from safedl.utils.tensors import predict


def _acc(model, x, y):
    return float((predict(model, x) == y).float().mean())


def test_pgd_at_least_as_strong_as_fgsm(tiny_model, eval_batch):
    x, y = eval_batch
    fgsm = registry.create("evasion", "fgsm", eps=0.1)
    pgd = registry.create("evasion", "pgd", eps=0.1, steps=20)
    assert _acc(tiny_model, pgd(tiny_model, x, y), y) <= _acc(tiny_model, fgsm(tiny_model, x, y), y)


def test_more_steps_and_restarts_do_not_weaken_pgd(tiny_model, eval_batch):
    x, y = eval_batch
    weak = registry.create("evasion", "pgd", eps=0.08, steps=5)
    strong = registry.create("evasion", "pgd", eps=0.08, steps=20, restarts=3)
    assert _acc(tiny_model, strong(tiny_model, x, y), y) <= _acc(tiny_model, weak(tiny_model, x, y), y)


def test_targeted_pgd_hits_target(tiny_model, eval_batch):
    x, y = eval_batch
    target = (y + 1) % 10
    x_adv = registry.create("evasion", "pgd", eps=0.3, steps=30)(tiny_model, x, y, target=target)
    hit = float((predict(tiny_model, x_adv) == target).float().mean())
    assert hit >= 0.9


def test_l2_pgd_stays_in_ball_and_uses_budget(tiny_model, eval_batch):
    x, y = eval_batch
    x_adv = registry.create("evasion", "pgd", eps=1.0, norm="l2", steps=20)(tiny_model, x, y)
    norms = (x_adv - x).flatten(1).norm(dim=1)
    assert float(norms.max()) <= 1.0 + 1e-4
    assert float(norms.median()) > 0.5  # not a degenerate zero step


def test_fgsm_matches_closed_form(tiny_model, eval_batch):
    """FGSM equals x + eps * sign(grad of the summed CE), clipped, computed by hand."""
    x, y = eval_batch
    xr = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(tiny_model(xr), y, reduction="sum").backward()
    expected = (x + 0.05 * xr.grad.sign()).clamp(0, 1)
    tiny_model.zero_grad(set_to_none=True)
    got = registry.create("evasion", "fgsm", eps=0.05)(tiny_model, x, y)
    assert torch.allclose(got, expected, atol=1e-6)
