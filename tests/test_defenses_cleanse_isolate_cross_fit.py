"""isolate_cross_fit: poison found with no trusted data and no known poison rate (planted, seeded digits).

Settings and recipe as bench/measure_poison_generalization.py's digits seed-0 cells (where the defaults were
chosen); numbers measured there are in the comments."""
from __future__ import annotations

import pytest
import torch

from _poison_planted import fit, rates
from safedl import registry
from safedl.data.dataset import PoisonedDataset
from safedl.errors import ConfigError


def _planted(splits, *, rate: float, seed: int = 0, **trigger):
    """``rate`` dirty-label static_patch poison to class 3, the model trained on it, and the cleanser's result
    (``trusted=None``) with the lengths of the data sets it trained on."""
    atk = registry.create("backdoor", "static_patch", target_class=3, poison_fraction=rate, label_mode="dirty",
                          seed=seed, **trigger)
    data = atk.poison(splits.train, generator=torch.Generator().manual_seed(seed))
    trained: list[int] = []
    res = registry.create("cleanser", "isolate_cross_fit").find_poison(
        data, model=fit(splits, data), trusted=None, train_fn=_train_fn(splits, trained))
    return data, res, trained


def _train_fn(splits, trained: list[int]):
    def train_fn(d, **kw):
        trained.append(len(d))
        return fit(splits, d, **kw)

    return train_fn


@pytest.fixture(scope="module")
def planted(digits_splits):
    """10% blended-noise backdoor (alpha 0.2, Chen et al. 2017) to class 3: about half of class 3 is poison."""
    return _planted(digits_splits, rate=0.1, trigger="random_noise", patch_size=None, blend_alpha=0.2)


@pytest.fixture(scope="module")
def checkerboard(digits_splits):
    """10% BadNets checkerboard (3x3, bottom right) to class 3: learned as fast as clean content, so early loss alone
    does not isolate it (the previous version found none: TPR 0.000, n=126)."""
    return _planted(digits_splits, rate=0.1, trigger="pattern", patch_size=3, position="bottom_right")


@pytest.fixture(scope="module")
def blended20(digits_splits):
    """20% blended noise to class 3: two in three samples of class 3 are poison (the previous version: TPR 0.000)."""
    return _planted(digits_splits, rate=0.2, trigger="random_noise", patch_size=None, blend_alpha=0.2)


@pytest.mark.parametrize("name", ["planted", "checkerboard", "blended20"])
def test_finds_planted_backdoor_without_trusted_data(name, request):
    data, res, _ = request.getfixturevalue(name)
    tpr, fpr = rates(res.is_suspect, data.is_poison)
    # the same setting in bench/measure_poison_generalization.py (digits seed 0, --trusted none --extra
    # isolate_cross_fit): checkerboard 10% TPR 0.937 FPR 0.029 (n=126), blended 10% 0.992 / 0.037
    # (bench/results/poison_generalization_untrusted2.jsonl; blended 20% at seeds 1 / 2: 0.996 / 0.992, n=251)
    assert tpr >= 0.9 and fpr <= 0.05, (tpr, fpr, res.info["per_class"])
    assert res.info["poisoned_classes"] == [3]


def test_scores_out_of_sample_with_isolated_samples_removed(planted):
    data, res, trained = planted
    # one isolation training on all the data (the model is given), then per round one model per fold, each on the
    # other fold less the isolated set
    assert trained[0] == len(data) and len(trained) in (3, 5)
    assert all(n < len(data) / 2 for n in trained[1:])
    assert 0 < res.info["isolation_epochs"] <= 15
    assert res.info["isolated"] >= round(0.2 * len(data))  # the superimposition set and the early-loss set
    assert res.info["isolated_per_round"] == sorted(res.info["isolated_per_round"])


def test_superimposition_isolates_the_poison_of_a_majority_poisoned_class(blended20):
    data, res, _ = blended20
    c3 = next(pc for pc in res.info["per_class"] if pc["class"] == 3)
    # two thirds of class 3 are poison; superimposition isolates them anyway (at most 0.8 of the class)
    assert c3["superimposed"] >= 0.5 * c3["n"] and c3["superimposed_rejected"] >= 0.5, c3


def test_clean_data_is_at_most_two_percent_flagged(digits_splits):
    clean = PoisonedDataset.from_clean(digits_splits.train, x=digits_splits.train.x, y=digits_splits.train.y)
    res = registry.create("cleanser", "isolate_cross_fit").find_poison(
        clean, model=fit(digits_splits, clean), train_fn=_train_fn(digits_splits, []))
    assert res.n_flagged / len(clean) <= 0.02, res.info["per_class"]


def test_needs_a_training_function(digits_splits, tiny_model):
    with pytest.raises(ConfigError, match="train_fn"):
        registry.create("cleanser", "isolate_cross_fit").find_poison(digits_splits.train, model=tiny_model)


def test_isolation_caps_each_class():
    comp = registry.create("cleanser", "isolate_cross_fit", isolation_fraction=0.5, max_class_isolated=0.25)
    y = torch.tensor([0] * 8 + [1] * 8)
    losses = torch.cat([torch.full((8,), 5.0), torch.arange(8.0) / 10])  # class 0 is all high-loss
    s = comp.suspects(losses, y)
    assert int(s[:8].sum()) == 2 and int(s.sum()) == 4  # two a class although class 0 holds the 8 highest losses
    assert s[8:].tolist() == [False] * 6 + [True] * 2


def test_isolation_rankings_share_one_cap_per_class():
    comp = registry.create("cleanser", "isolate_cross_fit", max_class_superimposed=0.5)
    y = torch.tensor([0] * 8 + [1] * 8)
    first = torch.arange(16.0)  # ascending: class 0 ranks first
    second = -torch.arange(16.0)  # class 1's last samples rank first
    third = (torch.arange(16.0) - 4) % 16  # samples 4, 5, ... first: class 0's remaining ones, then class 1
    s = comp.isolate([(first, False, 0.25, 1.0), (second, False, 0.25, 1.0), (third, False, 0.5, 1.0)], y)
    # each class's shared cap (half of 8) is full after the first two rankings: the third adds nothing
    assert s[:8].tolist() == [True] * 4 + [False] * 4 and s[8:].tolist() == [False] * 4 + [True] * 4
