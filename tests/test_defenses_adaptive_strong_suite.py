"""The strong adaptive suite (APGD-CE + APGD-DLR with restarts through BPDA/EOT) on binarization: its robust accuracy
is the worst case, not above what a 100-step, 3-restart BPDA PGD with a margin loss leaves."""
from __future__ import annotations

import torch

from safedl import registry
from safedl.attacks.base import input_grad, make_generator
from safedl.attacks.evasion._losses import margin
from safedl.attacks.evasion._lp import project, random_start, steepest_step
from safedl.defenses.adaptive import defended_model, strong_adaptive_suite

EPS = 0.2


def _margin_bpda_pgd(model, squeeze, x, y, *, eps, steps=100, restarts=3, seed=0):
    """Reference attack: PGD on the margin loss through BPDA (identity backward), per-sample first success over
    restarts, success judged on the deployed (squeezed) system."""
    facing = defended_model([squeeze], model, adaptive=True)
    deployed = defended_model([squeeze], model, adaptive=False)
    gen = make_generator(seed, x.device)
    alpha = 2.5 * eps / steps
    robust = torch.ones(len(x), dtype=torch.bool)
    with torch.no_grad():
        robust &= deployed(x).argmax(1) == y
    for _ in range(restarts):
        delta = random_start(x, "linf", eps, gen)
        for _ in range(steps):
            xa = (x + delta).requires_grad_(True)
            g = input_grad(-margin(facing(xa), y).sum(), xa)
            delta = project(delta + alpha * steepest_step(g, "linf"), "linf", eps)
            delta = (x + delta).clamp(0, 1) - x
            with torch.no_grad():
                robust &= deployed(x + delta).argmax(1) == y
    return robust


def test_suite_on_binarization_is_not_weaker_than_margin_bpda_pgd(tiny_model, eval_batch):
    x, y = eval_batch
    squeeze = registry.create("preprocessor", "feature_squeezing", bit_depth=1)
    res = strong_adaptive_suite(tiny_model, x, y, eps=EPS, norm="linf", seed=0, preprocessors=[squeeze])
    ref = _margin_bpda_pgd(tiny_model, squeeze, x, y, eps=EPS)
    assert res.robust_accuracy()["n"] == len(x)
    assert int(res.robust.sum()) <= int(ref.sum())
    assert int(ref.sum()) < len(x) and int(res.robust.sum()) < int((res.broken_by != -2).sum())  # attacks bite
    # every sample the suite claims broken is misclassified by the deployed system, within the budget
    broken = res.broken_by >= 0
    deployed = defended_model([squeeze], tiny_model, adaptive=False)
    with torch.no_grad():
        assert bool((deployed(res.x_adv[broken]).argmax(1) != y[broken]).all())
    assert float((res.x_adv - x).abs().max()) <= EPS + 1e-6
    assert res.budget == {"norm": "linf", "eps": EPS, "steps": 100, "restarts": 3, "eot_samples": 8,
                          "bpda": ["approx"], "seed": 0, "early_stop": True}
    assert res.members == ["apgd_ce", "apgd_dlr"]
