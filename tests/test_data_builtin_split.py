"""Built-in data sets, Dataset / PoisonedDataset invariants and the deterministic stratified split."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from safedl.data import Dataset, PoisonedDataset, load_builtin, stratified_split
from safedl.errors import ConfigError, DataError, UnknownComponentError


# Pinned with scikit-learn's current train_test_split; see test_builtin_and_split_hashes_are_pinned.
MNIST5K_HASH = "5d0d7eabb8c562dbc8a89ef5735ba50cb9d6e59a5638a3a6f4344ff6858ea468"
DIGITS_SPLIT_HASHES = {
    "train": "3097a721ddc9cb9083f3b05b028a899562fdeccf5277de6611d1ab0c1a9c9cef",
    "val": "08397b32bdd345450aef26fe0f0d526aceecf75bf22f1c5ac49027c719f3ae4e",
    "test": "5f8da7133d9f8e05ae58768b5dcc40ef2448da0b69ff2ef6d275992d6fac600f",
}

@pytest.fixture(scope="module")
def mnist5k():
    return load_builtin("mnist5k")


def test_mnist5k_is_5000_real_digits(mnist5k):
    assert mnist5k.x.shape == (5000, 1, 28, 28) and mnist5k.x.dtype == torch.float32
    assert mnist5k.y.dtype == torch.int64 and mnist5k.num_classes == 10
    assert float(mnist5k.x.min()) == 0.0 and float(mnist5k.x.max()) == 1.0
    counts = mnist5k.class_counts()
    assert sum(counts) == 5000 and all(450 <= c <= 550 for c in counts), counts
    # Real handwriting: the centre is inked far more often than the corners.
    assert mnist5k.x[:, :, 10:18, 10:18].mean() > 5 * mnist5k.x[:, :, :4, :4].mean()


def test_digits_is_sklearn_8x8(digits_splits):
    d = load_builtin("digits")
    assert d.x.shape == (1797, 1, 8, 8) and d.num_classes == 10
    assert float(d.x.min()) == 0.0 and float(d.x.max()) == 1.0
    assert torch.equal(d.x * 16, (d.x * 16).round())  # 17 grey levels, scaled exactly by 1/16


def test_unknown_builtin_lists_valid_names():
    with pytest.raises(UnknownComponentError, match="mnist5k.*digits"):
        load_builtin("cifar100")


def test_dataset_rejects_mis_shaped_tensors():
    with pytest.raises(DataError):
        Dataset(torch.zeros(4, 8, 8), torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(DataError, match="4 images"):
        Dataset(torch.zeros(4, 1, 8, 8), torch.zeros(3, dtype=torch.long), 2)


def test_poisoned_dataset_ground_truth_from_clean():
    clean = Dataset(torch.rand(6, 1, 4, 4), torch.arange(6) % 3, 3, "c")
    x, y = clean.x.clone(), clean.y.clone()
    x[1, 0, 0, 0] = 1.0 - x[1, 0, 0, 0]  # image changed
    y[4] = (y[4] + 1) % 3                # label changed
    p = PoisonedDataset.from_clean(clean, x=x, y=y)
    assert p.is_poison.tolist() == [False, True, False, False, True, False]
    assert p.label_changed.tolist() == [False, False, False, False, True, False]
    sub = p.subset(torch.tensor([4, 0]))
    assert sub.is_poison.tolist() == [True, False] and torch.equal(sub.original_y, clean.y[[4, 0]])
    with pytest.raises(DataError):
        PoisonedDataset(x, y, 3, is_poison=torch.zeros(5, dtype=torch.bool))


def _per_class_error(splits, data, fractions) -> float:
    n = np.array(data.class_counts())
    return max(float(np.abs(np.array(part.class_counts()) - f * n).max())
               for part, f in zip((splits.train, splits.val, splits.test), fractions))


def _imbalanced(n_per_class=(3, 7, 11, 40, 97, 13)) -> Dataset:
    y = torch.cat([torch.full((k,), c) for c, k in enumerate(n_per_class)])
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    x = torch.rand(len(y), 1, 2, 2, generator=torch.Generator().manual_seed(1))
    return Dataset(x, y, len(n_per_class), "imbalanced")


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_is_stratified_disjoint_and_complete(mnist5k, seed):
    for data in (mnist5k, load_builtin("digits"), _imbalanced()):
        s = stratified_split(data, test_fraction=0.2, val_fraction=0.1, seed=seed)
        assert len(s.train) + len(s.val) + len(s.test) == len(data)
        assert _per_class_error(s, data, (0.7, 0.1, 0.2)) <= 1.0, data.name
        # Disjoint and complete: every row of the data set appears in exactly one split (rows are identified by
        # their content plus label; duplicates are counted as a multiset).
        def rows(d):
            return Counter(r.tobytes() for r in torch.cat([d.x.flatten(1), d.y[:, None].float()], 1).numpy())

        assert rows(s.train) + rows(s.val) + rows(s.test) == rows(data), data.name


def test_split_is_deterministic_and_seed_dependent(mnist5k):
    a = stratified_split(mnist5k, test_fraction=0.2, val_fraction=0.1, seed=0)
    b = stratified_split(mnist5k, test_fraction=0.2, val_fraction=0.1, seed=0)
    c = stratified_split(mnist5k, test_fraction=0.2, val_fraction=0.1, seed=1)
    assert a.hashes() == b.hashes()
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.train.y, b.train.y)
    assert all(a.hashes()[k] != c.hashes()[k] for k in ("train", "val", "test"))
    assert (len(a.train), len(a.val), len(a.test)) == (3500, 500, 1000)


def test_split_hash_is_content_hash(digits_splits):
    h = digits_splits.hashes()
    assert len(set(h.values())) == 3 and all(len(v) == 64 for v in h.values())
    test = digits_splits.test
    same = Dataset(test.x.clone(), test.y.clone(), 10, "other name")
    assert same.content_hash() == h["test"]
    flipped = test.y.clone()
    flipped[0] = (flipped[0] + 1) % 10
    assert Dataset(test.x, flipped, 10).content_hash() != h["test"]


def test_split_mean_std_come_from_train_only(digits_splits):
    s = digits_splits
    assert s.mean == pytest.approx((float(s.train.x.mean()),), abs=1e-6)
    assert s.std == pytest.approx((float(s.train.x.std()),), abs=1e-6)


def test_split_without_val(mnist5k):
    s = stratified_split(load_builtin("digits"), test_fraction=0.25, val_fraction=0.0, seed=3)
    assert len(s.val) == 0 and len(s.train) + len(s.test) == 1797


@pytest.mark.parametrize("test_fraction,val_fraction", [(0.0, 0.1), (1.0, 0.0), (0.6, 0.4), (0.2, -0.1)])
def test_split_rejects_bad_fractions(test_fraction, val_fraction):
    with pytest.raises(ConfigError, match="test_fraction"):
        stratified_split(load_builtin("digits"), test_fraction=test_fraction, val_fraction=val_fraction, seed=0)


def test_builtin_calls_do_not_share_tensors():
    a = load_builtin("digits")
    first = a.x[0].clone()
    a.x[0] = 0.5
    a.y[0] = 9
    b = load_builtin("digits")
    assert torch.equal(b.x[0], first)  # the mutation of a's image did not reach b
    assert b.y[0] == 0  # sklearn's first digit is a 0


def test_builtin_and_split_hashes_are_pinned(mnist5k):
    """Run directories record these hashes; a change in loading, scaling or splitting must be noticed here."""
    assert mnist5k.content_hash() == MNIST5K_HASH
    s = stratified_split(load_builtin("digits"), test_fraction=0.2, val_fraction=0.1, seed=0)
    assert s.hashes() == DIGITS_SPLIT_HASHES
