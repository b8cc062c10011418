"""White-box evasion attacks beyond the conformance suite: APGD, targeted DLR, Carlini-Wagner L2, DeepFool."""
from __future__ import annotations

import pytest
import torch

from safedl import registry
from safedl.attacks.evasion._apgd import checkpoints
from safedl.attacks.evasion._losses import dlr_loss, dlr_targeted_loss
from safedl.utils.tensors import predict


def _acc(model, x, y):
    return float((predict(model, x) == y).float().mean())


def _l2(a, b):
    return (a - b).flatten(1).norm(dim=1)


def test_apgd_checkpoints_follow_the_paper():
    # p_j: 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (Croce & Hein 2020, Sec. 3.2)
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_dlr_losses_are_scale_invariant_and_signed():
    z = torch.tensor([[5.0, 1.0, 0.5, 0.0], [1.0, 4.0, 0.5, 0.0]])
    y = torch.tensor([0, 0])
    assert torch.allclose(dlr_loss(z, y), dlr_loss(3 * z + 1, y), atol=1e-6)
    assert float(dlr_loss(z, y)[0]) < 0 < float(dlr_loss(z, y)[1])  # positive once misclassified
    t = torch.tensor([1, 1])
    assert float(dlr_targeted_loss(z, y, t)[1]) > float(dlr_targeted_loss(z, y, t)[0])


def test_apgd_at_least_as_strong_as_pgd_same_budget(tiny_model, eval_batch):
    x, y = eval_batch
    for eps in (0.05, 0.1):
        pgd = registry.create("evasion", "pgd", eps=eps, steps=20)(tiny_model, x, y)
        apgd = registry.create("evasion", "apgd_ce", eps=eps, steps=20)(tiny_model, x, y)
        assert _acc(tiny_model, apgd, y) <= _acc(tiny_model, pgd, y)


def test_apgd_l2_stays_in_ball_and_beats_pgd_l2(tiny_model, eval_batch):
    x, y = eval_batch
    apgd = registry.create("evasion", "apgd_ce", eps=0.5, norm="l2", steps=20)(tiny_model, x, y)
    pgd = registry.create("evasion", "pgd", eps=0.5, norm="l2", steps=20)(tiny_model, x, y)
    assert float(_l2(apgd, x).max()) <= 0.5 + 1e-4
    assert _acc(tiny_model, apgd, y) <= _acc(tiny_model, pgd, y)


def test_targeted_dlr_hits_targets(tiny_model, eval_batch):
    x, y = eval_batch
    target = (y + 1) % 10
    x_adv = registry.create("evasion", "apgd_dlr", eps=0.3, steps=30)(tiny_model, x, y, target=target)
    assert float((predict(tiny_model, x_adv) == target).float().mean()) >= 0.9


def test_apgd_t_not_weaker_than_untargeted_dlr(tiny_model, eval_batch):
    x, y = eval_batch
    plain = registry.create("evasion", "apgd_dlr", eps=0.06, steps=15)(tiny_model, x, y)
    multi = registry.create("evasion", "apgd_dlr", eps=0.06, steps=15, n_target_classes=3)(tiny_model, x, y)
    assert float((multi - x).abs().max()) <= 0.06 + 1e-6
    assert _acc(tiny_model, multi, y) <= _acc(tiny_model, plain, y)


@pytest.fixture(scope="module")
def cw_run(tiny_model, eval_batch):
    x, y = eval_batch[0][:64], eval_batch[1][:64]
    return x, y, registry.create("evasion", "cw_l2", binary_search_steps=5, steps=50)(tiny_model, x, y)


def test_cw_smaller_l2_than_pgd_l2_at_equal_success(tiny_model, cw_run):
    x, y, cw = cw_run
    clean = predict(tiny_model, x) == y
    pgd = registry.create("evasion", "pgd", eps=1.5, norm="l2", steps=20)(tiny_model, x, y)
    ok_pgd = clean & (predict(tiny_model, pgd) != y)
    ok_cw = clean & (predict(tiny_model, cw) != y)
    assert int(ok_cw.sum()) >= int(ok_pgd.sum())
    both = ok_pgd & ok_cw
    assert float(_l2(cw, x)[both].median()) < float(_l2(pgd, x)[both].median())


def test_cw_perturbation_is_near_minimal(tiny_model, cw_run):
    """Half of CW's perturbation should leave most broken samples correctly classified again."""
    x, y, cw = cw_run
    broken = (predict(tiny_model, x) == y) & (predict(tiny_model, cw) != y)
    half = x + 0.5 * (cw - x)
    assert float((predict(tiny_model, half[broken]) == y[broken]).float().mean()) >= 0.8


def test_cw_targeted_and_confidence(tiny_model, cw_run):
    x, y, weak = cw_run
    x, y, weak = x[:32], y[:32], weak[:32]
    target = (y + 3) % 10
    # pixels at exactly 0 or 1 start deep in tanh's flat tails, so targeted runs need more steps to move them
    adv = registry.create("evasion", "cw_l2", binary_search_steps=3, initial_const=1.0, steps=150, lr=0.1)(
        tiny_model, x, y, target=target)
    assert float((predict(tiny_model, adv) == target).float().mean()) >= 0.9
    strong = registry.create("evasion", "cw_l2", binary_search_steps=5, steps=50, confidence=5.0)(tiny_model, x, y)
    both = (predict(tiny_model, strong) != y) & (predict(tiny_model, weak) != y)
    assert float(_l2(strong, x)[both].median()) > float(_l2(weak, x)[both].median())  # kappa buys margin with norm


def test_deepfool_l2_and_linf_minimal_and_eps_bound(tiny_model, eval_batch):
    x, y = eval_batch
    clean = predict(tiny_model, x) == y
    for norm in ("l2", "linf"):
        adv = registry.create("evasion", "deepfool", norm=norm)(tiny_model, x, y)
        broken = clean & (predict(tiny_model, adv) != y)
        assert float(broken.sum()) >= 0.95 * float(clean.sum())
        half = x + 0.5 * (adv - x)
        assert float((predict(tiny_model, half[broken]) == y[broken]).float().mean()) >= 0.8
    bounded = registry.create("evasion", "deepfool", norm="linf", eps=0.05)
    assert bounded.bounded
    adv = bounded(tiny_model, x, y)
    assert float((adv - x).abs().max()) <= 0.05 + 1e-6
    assert not registry.create("evasion", "deepfool").bounded


def test_deepfool_l2_smaller_than_pgd_l2(tiny_model, eval_batch):
    x, y = eval_batch
    df = registry.create("evasion", "deepfool", norm="l2")(tiny_model, x, y)
    pgd = registry.create("evasion", "pgd", eps=1.5, norm="l2", steps=20)(tiny_model, x, y)
    both = (predict(tiny_model, df) != y) & (predict(tiny_model, pgd) != y)
    assert float(_l2(df, x)[both].median()) < float(_l2(pgd, x)[both].median())
