"""DBSCAN cleanser (Ester et al. 1996) on per-class penultimate features: planted poison is found above chance,
and the clustering matches scikit-learn's DBSCAN run by hand on the same reduced features."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _poison_planted import TARGET, fit, plant_backdoor, plant_flips, rates
from safedl import registry
from safedl.defenses.cleanse.dbscan import k_distance, reduce
from safedl.errors import ConfigError
from safedl.models.features import extract_features
from safedl.utils.stats import proportion


@pytest.fixture(scope="module")
def planted(digits_splits):
    p = plant_backdoor(digits_splits.train, 0.03)  # about 38 patched images, a quarter of class 7
    return p, fit(digits_splits, p)


def test_finds_planted_backdoor_poison_above_chance(planted):
    from sklearn.metrics import roc_auc_score

    p, m = planted
    res = registry.create("cleanser", "dbscan").find_poison(p, model=m)
    truth = p.is_poison
    tpr, fpr = rates(res.is_suspect, truth)
    # chance: flagging the same share at random finds poison at the flag rate; the cleanser must do far better
    flag_rate = float(res.is_suspect.float().mean())
    lo = proportion(int((res.is_suspect & truth).sum()), int(truth.sum()))["ci95"][0]
    assert lo > flag_rate + 0.2, (tpr, fpr, flag_rate)
    assert roc_auc_score(truth.numpy(), res.score.numpy()) > 0.8
    assert fpr < 0.15
    entry = next(e for e in res.info["per_class"] if e["class"] == TARGET)
    assert entry["flagged"] >= int(0.5 * truth.sum())


def test_finds_scattered_label_flips_as_noise(digits_splits):
    from sklearn.metrics import roc_auc_score

    p = plant_flips(digits_splits.train, 0.05)
    res = registry.create("cleanser", "dbscan").find_poison(p, model=fit(digits_splits, p))
    assert roc_auc_score(p.is_poison.numpy(), res.score.numpy()) > 0.75
    assert rates(res.is_suspect, p.is_poison)[0] > 2 * float(res.is_suspect.float().mean())


def test_clusters_match_sklearn_dbscan_by_hand(planted):
    from sklearn.cluster import DBSCAN

    p, m = planted
    res = registry.create("cleanser", "dbscan", eps=None, min_samples=5, noise_fraction=0.05).find_poison(p, model=m)
    feats = extract_features(m, p.x).double().numpy()
    idx = (p.y == TARGET).nonzero().flatten().numpy()
    z = reduce(feats[idx], 10)
    eps = float(np.quantile(k_distance(z, 5), 0.95))
    labels = DBSCAN(eps=eps, min_samples=5).fit_predict(z)
    ids, sizes = np.unique(labels[labels >= 0], return_counts=True)
    big = ids[np.argmax(sizes)]
    expect = (labels < 0) | ((labels != big) & np.isin(labels, ids[sizes / len(z) < 0.35]))
    assert np.array_equal(res.is_suspect[idx].numpy(), expect)


def test_k_distance_on_a_line():
    z = np.array([[0.0], [1.0], [3.0], [7.0]])
    assert np.allclose(k_distance(z, 1), [1.0, 1.0, 2.0, 4.0])
    assert np.allclose(k_distance(z, 2), [3.0, 2.0, 3.0, 6.0])


def test_needs_a_model_and_validates():
    from safedl.data.dataset import Dataset

    with pytest.raises(ConfigError, match="model"):
        registry.create("cleanser", "dbscan").find_poison(Dataset(torch.rand(10, 1, 8, 8), torch.arange(10) % 2, 2))
    for key, value in (("eps", 0.0), ("min_samples", 0), ("noise_fraction", 1.0), ("max_cluster_share", 1.5)):
        with pytest.raises(ConfigError, match=key):
            registry.create("cleanser", "dbscan", **{key: value})
