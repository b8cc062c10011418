"""Model repairs on a planted backdoor (8x8 digits, 2x2 patch, target 7): the input model is never mutated."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _poison_planted import TARGET, acc, asr, fit, plant_backdoor
from safedl import registry
from safedl.defenses.repair._common import last_conv, mean_activation
from safedl.defenses.repair.neural_cleanse import anomaly_index, stamp
from safedl.utils.tensors import predict


@pytest.fixture(scope="module")
def backdoored(digits_splits):
    p = plant_backdoor(digits_splits.train, 0.1)
    m = fit(digits_splits, p)
    assert asr(m, digits_splits) > 0.9
    return m


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _unchanged(m, snap):
    return all(torch.equal(v, snap[k]) for k, v in m.state_dict().items())


def test_neural_cleanse_flags_target_and_unlearns(backdoored, digits_splits):
    snap = _snapshot(backdoored)
    nc = registry.create("repair", "neural_cleanse", steps=40, batch_size=64, early_stop_patience=10)
    fixed = nc.repair(backdoored, clean=digits_splits.val, seed=0)
    assert _unchanged(backdoored, snap) and fixed is not backdoored
    assert nc.report_["infected_classes"] == [TARGET]
    idx = torch.tensor(nc.report_["anomaly_index"])
    assert int(idx.argmax()) == TARGET and float(idx[TARGET]) > 2.0
    # the reversed trigger for the target is the smallest one
    assert int(torch.tensor(nc.report_["trigger_l1"]).argmin()) == TARGET
    assert asr(fixed, digits_splits) < 0.3
    assert acc(fixed, digits_splits.test) > acc(backdoored, digits_splits.test) - 0.1
    # the kept trigger is a successful one: it sends >= attack_succ_threshold of the clean images to the target
    x = digits_splits.val.x[digits_splits.val.y != TARGET]
    hit = (predict(backdoored, stamp(x, nc.masks_[TARGET], nc.patterns_[TARGET])) == TARGET).float().mean()
    assert float(hit) >= 0.97
    assert float(nc.masks_[TARGET].sum()) == pytest.approx(nc.report_["trigger_l1"][TARGET], abs=1e-2)


def test_anomaly_index_is_the_papers_mad_with_numpy_median():
    norms = torch.tensor([2.0, 20.0, 21.0, 22.0, 24.0, 30.0, 31.0, 40.0, 50.0, 60.0])
    med = float(np.median(norms.numpy()))  # 27.0: mean of the middle two (torch.median would give 24)
    mad = 1.4826 * float(np.median(np.abs(norms.numpy() - med)))
    idx = anomaly_index(norms)
    assert torch.allclose(idx, (med - norms) / mad)
    assert float(idx[0]) > 2 > float(idx[1:].max())


def test_log_space_anomaly_index_finds_a_tiny_trigger_among_bimodal_clean_norms():
    # mnist5k's shape: the target's trigger is 14x smaller than the median, the clean norms split into two groups
    norms = torch.tensor([22.0, 55.0, 24.0, 26.0, 52.0, 21.0, 58.0, 1.5, 28.0, 60.0])
    assert float(anomaly_index(norms)[7]) < 2  # the paper's L1 index misses it
    logged = anomaly_index(norms, log=True)
    assert torch.allclose(logged, anomaly_index(norms.log()))
    assert int(logged.argmax()) == 7 and float(logged[7]) > 2 > float(logged[torch.arange(10) != 7].max())


def test_neural_cleanse_cost_schedule_shrinks_a_successful_mask(backdoored, digits_splits):
    # lambda starts at 0 and is only set after `patience` successful passes: with patience > steps it never is
    x = digits_splits.val.x[digits_splits.val.y != 3]
    free = registry.create("repair", "neural_cleanse", steps=6, patience=100, batch_size=64)
    mk0, _, l1_free = free.reverse_trigger(backdoored, x, 3, generator=torch.Generator().manual_seed(0))
    paid = registry.create("repair", "neural_cleanse", steps=40, patience=2, batch_size=64)
    mk1, pt1, l1_paid = paid.reverse_trigger(backdoored, x, 3, generator=torch.Generator().manual_seed(0))
    assert l1_paid < 0.5 * l1_free  # the cost schedule shrinks the mask
    hit = (predict(backdoored, stamp(x, mk1, pt1)) == 3).float().mean()
    assert float(hit) >= 0.97


def test_fine_pruning_prunes_dormant_channels_within_accuracy_bound(backdoored, digits_splits):
    snap = _snapshot(backdoored)
    fp = registry.create("repair", "fine_pruning", max_accuracy_drop=0.05, epochs=0)
    pruned = fp.repair(backdoored, clean=digits_splits.val, seed=0)
    assert _unchanged(backdoored, snap)
    r = fp.report_
    assert r["pruned"] > 0
    assert r["clean_accuracy_before"] - r["clean_accuracy_pruned"] <= 0.05 + 1e-9
    # the pruned channels are the most dormant ones on clean data, and they are now silent
    act = mean_activation(backdoored, last_conv(backdoored), digits_splits.val.x)
    dormant = torch.argsort(act)[: r["pruned"]]
    w = last_conv(pruned).weight.detach()
    assert float(w[dormant].abs().sum()) == 0.0
    assert float(w.flatten(1).abs().sum(1).gt(0).sum()) == len(act) - r["pruned"]


def test_fine_pruning_fine_tuning_removes_backdoor_that_pruning_leaves(backdoored, digits_splits):
    only = registry.create("repair", "fine_pruning", epochs=0).repair(backdoored, clean=digits_splits.val, seed=0)
    fp = registry.create("repair", "fine_pruning")
    fixed = fp.repair(backdoored, clean=digits_splits.val, seed=0)
    assert asr(only, digits_splits) > 0.9  # the planted backdoor is not in the dormant channels alone
    assert asr(fixed, digits_splits) < asr(only, digits_splits) - 0.3
    assert acc(fixed, digits_splits.test) > acc(backdoored, digits_splits.test) - 0.05


def test_fine_pruning_fine_tune_keeps_pruned_channels_zero(backdoored, digits_splits):
    fp = registry.create("repair", "fine_pruning", max_accuracy_drop=0.05, epochs=2)
    out = fp.repair(backdoored, clean=digits_splits.val, seed=0)
    w = last_conv(out).weight.detach().flatten(1).abs().sum(1)
    assert int((w == 0).sum()) == fp.report_["pruned"]
    assert set(out.state_dict()) == set(backdoored.state_dict())  # masks folded into plain weights


@pytest.mark.parametrize("scope", ["last_conv", "penultimate"])
def test_pruning_removes_requested_share(backdoored, digits_splits, scope):
    snap = _snapshot(backdoored)
    pr = registry.create("repair", "pruning", pruning_ratio=0.5, scope=scope)
    out = pr.repair(backdoored, clean=digits_splits.val, seed=0)
    assert _unchanged(backdoored, snap)
    net = out[1]
    if scope == "last_conv":
        w = last_conv(out).weight.detach().flatten(1).abs().sum(1)
    else:
        w = net.classifier.weight.detach().abs().sum(0)
    assert int((w == 0).sum()) == pr.report_["pruned"] == len(w) // 2
