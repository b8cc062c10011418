"""FAB-T (Croce & Hein 2020): minimal-norm steps onto the linearised boundary, results within the eps budget."""
from __future__ import annotations

import torch

from safedl import registry
from safedl.attacks.evasion.ensemble import DEFAULT_ATTACKS
from safedl.attacks.evasion.fab import hyperplane_step
from safedl.utils.tensors import predict


def _acc(model, x, y):
    return float((predict(model, x) == y).float().mean())


def test_hyperplane_step_is_the_minimal_norm_solution():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 1, 4, 4, generator=g)
    c = torch.randn(5, generator=g)
    for norm, dual in (("linf", 1), ("l2", 2)):
        d = hyperplane_step(w, c, norm)
        assert torch.allclose((w * d).flatten(1).sum(1), c, atol=1e-5)  # on the hyperplane
        size = d.flatten(1).abs().amax(1) if norm == "linf" else d.flatten(1).norm(dim=1)
        # Hoelder: |c| = |<w, d>| <= |w|_dual |d|, with equality only for the minimal-norm d
        assert torch.allclose(size, c.abs() / w.flatten(1).norm(p=dual, dim=1), atol=1e-5)


def test_fab_t_breaks_samples_within_the_budget(tiny_model, eval_batch):
    x, y = eval_batch
    for norm, eps in (("linf", 0.1), ("l2", 1.0)):
        x_adv = registry.create("evasion", "fab", eps=eps, norm=norm, steps=50, n_target_classes=3)(tiny_model, x, y)
        d = (x_adv - x).flatten(1)
        size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
        assert float(size.max()) <= eps * (1 + 1e-5) and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
        changed = size > 0
        assert bool((predict(tiny_model, x_adv[changed]) != y[changed]).all())  # only successes are returned
        assert _acc(tiny_model, x_adv, y) <= _acc(tiny_model, x, y) - 0.3


def test_fab_with_a_target_hits_it_or_leaves_the_input(tiny_model, eval_batch):
    x, y = eval_batch
    t = (y + 1) % 10
    x_adv = registry.create("evasion", "fab", eps=0.3, steps=50)(tiny_model, x, y, target=t)
    changed = (x_adv != x).flatten(1).any(1)
    assert int(changed.sum()) >= len(x) // 2
    assert bool((predict(tiny_model, x_adv[changed]) == t[changed]).all())


def test_default_ensemble_is_autoattacks_standard_suite():
    assert [a["name"] for a in DEFAULT_ATTACKS] == ["apgd_ce", "apgd_dlr", "fab", "square"]
    ens = registry.create("evasion", "ensemble", eps=0.1)
    assert [a["name"] for a in ens.member_specs] == ["apgd_ce", "apgd_dlr", "fab", "square"]
    assert ens.member_specs[2]["params"]["n_target_classes"] == 9 and ens.member_specs[2]["params"]["eps"] == 0.1
