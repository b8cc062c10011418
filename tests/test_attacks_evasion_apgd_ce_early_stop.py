"""Per-sample early stopping in Auto-PGD: a sample leaves the batch at its first success, which saves work and
cannot change the success set or the examples (every APGD update is per sample)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from safedl import registry
from safedl.defenses.adaptive import strong_adaptive_suite


class CountingModel(nn.Module):
    """Counts the samples pushed through ``model``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.samples = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.samples += len(x)
        return self.model(x)


@pytest.mark.parametrize("name,params", [
    ("apgd_ce", {"eps": 0.1, "norm": "linf"}),
    ("apgd_ce", {"eps": 1.0, "norm": "l2"}),
    ("apgd_dlr", {"eps": 0.1, "norm": "linf"}),
    ("apgd_dlr", {"eps": 0.1, "norm": "linf", "n_target_classes": 3}),
])
def test_early_stop_keeps_the_success_set_and_examples(tiny_model, eval_batch, name, params):
    x, y = eval_batch
    runs = {}
    for stop in (False, True):
        counted = CountingModel(tiny_model)
        attack = registry.create("evasion", name, steps=30, restarts=2, seed=0, early_stop=stop, **params)
        x_adv = attack(counted, x, y)
        with torch.no_grad():
            success = tiny_model(x_adv).argmax(1) != y
        runs[stop] = (x_adv, success, counted.samples)
    (adv_full, ok_full, n_full), (adv_stop, ok_stop, n_stop) = runs[False], runs[True]
    assert 0 < int(ok_full.sum()) < len(y)  # the test means something: some samples break, some do not
    assert torch.equal(ok_full, ok_stop)
    assert torch.allclose(adv_full, adv_stop, atol=1e-5)
    assert n_stop < n_full  # and it did less work


def test_strong_suite_early_stop_matches_the_full_loop(tiny_model, eval_batch):
    x, y = eval_batch
    full, stop = (strong_adaptive_suite(tiny_model, x, y, eps=0.1, steps=20, restarts=2, seed=0, early_stop=s)
                  for s in (False, True))
    assert torch.equal(full.broken_by, stop.broken_by)
    assert torch.equal(full.robust, stop.robust)
    assert stop.budget["early_stop"] and not full.budget["early_stop"]
