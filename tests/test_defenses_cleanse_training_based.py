"""Cleansers that train their own models: cross-validated data cleaning, TracIn influence, provenance, RONI."""
from __future__ import annotations

import pytest
import torch

from _poison_planted import fit, plant_backdoor, plant_flips
from safedl import registry
from safedl.data.dataset import Dataset
from safedl.defenses.cleanse.provenance_tracking import build_manifest, verify_manifest
from safedl.errors import ConfigError


@pytest.fixture(scope="module")
def flipped(digits_splits):
    return plant_flips(digits_splits.train, 0.1)


@pytest.fixture(scope="module")
def cv_losses(flipped, digits_splits):
    seen: list[set] = []

    def train_fn(d, **kw):
        seen.append({tuple(r) for r in d.x.flatten(1)[:, 20:40].tolist()})  # rows it trained on
        return fit(digits_splits, d, epochs=10)

    res = registry.create("cleanser", "data_cleaning", n_folds=3).find_poison(flipped, train_fn=train_fn)
    return res, seen


def test_data_cleaning_finds_flipped_labels(cv_losses, flipped):
    res, _ = cv_losses
    tp = int((res.is_suspect & flipped.is_poison).sum())
    precision, recall = tp / max(1, res.n_flagged), tp / flipped.n_poison
    assert precision >= 0.8 and recall >= 0.8, (precision, recall)
    z = registry.create("cleanser", "data_cleaning", method="outlier_detection").find_poison(flipped, losses=res.score)
    tp = int((z.is_suspect & flipped.is_poison).sum())
    assert tp / max(1, z.n_flagged) >= 0.8 and tp / flipped.n_poison >= 0.8


def test_data_cleaning_scores_out_of_fold(cv_losses, flipped):
    _, seen = cv_losses
    assert len(seen) == 3
    # every fold model trained on about 2/3 of the data, and each sample was left out of one fold
    assert all(abs(len(s) - 2 * len(flipped) / 3) < 0.05 * len(flipped) for s in seen)


def test_data_cleaning_refuses_to_score_with_a_memorising_model(flipped, tiny_model):
    with pytest.raises(ConfigError, match="train_fn"):
        registry.create("cleanser", "data_cleaning").find_poison(flipped, model=tiny_model)


def test_tracin_influence_ranks_flipped_labels_as_harmful(flipped, digits_splits):
    from sklearn.metrics import roc_auc_score

    snaps = []
    m = fit(digits_splits, flipped, epochs=10, on_epoch_end=lambda e, mm: snaps.append(
        {k: v.clone() for k, v in mm.state_dict().items()}))
    res = registry.create("cleanser", "influence_functions").find_poison(flipped, model=m, trusted=digits_splits.val,
                                                                         checkpoints=snaps)
    assert res.info["checkpoints"] == 8
    assert roc_auc_score(flipped.is_poison.numpy(), res.score.numpy()) > 0.6
    assert float(res.score[flipped.is_poison].median()) > float(res.score[~flipped.is_poison].median())
    with pytest.raises(ConfigError, match="trusted"):
        registry.create("cleanser", "influence_functions").find_poison(flipped, model=m)


def test_provenance_detects_tampering_and_forged_manifests(digits_splits):
    clean = digits_splits.train
    p = plant_backdoor(clean, 0.05)
    sources = torch.arange(len(clean)) % 4
    key = b"k" * 32
    manifest = build_manifest(clean, sources, key=key)
    assert verify_manifest(manifest, key=key) and not verify_manifest(manifest, key=b"x" * 32)
    pt = registry.create("cleanser", "provenance_tracking", source_test=False)
    # signed at ingestion over the data as received: contributed poison is invisible to the hash check ...
    received = build_manifest(p.clean_view(), sources, key=key)
    assert pt.check_manifest(p, manifest=received, key=key).n_flagged == 0
    # ... which finds exactly the samples altered in storage after signing, poison or not
    altered = Dataset(p.x.clone(), p.y.clone(), p.num_classes)
    idx = torch.tensor([3, 50, 51, 400])
    altered.x[idx] = 1.0 - altered.x[idx]
    res = pt.find_poison(altered, manifest=received, key=key)
    assert res.info["signature_valid"] and torch.nonzero(res.is_suspect).flatten().tolist() == idx.tolist()
    forged = dict(manifest, sha256=build_manifest(p, sources, key=b"attacker" * 4)["sha256"])
    res2 = pt.find_poison(p, manifest=forged, key=key)
    assert res2.info["signature_valid"] is False


def test_provenance_source_test_flags_the_poisoning_source(digits_splits):
    clean = digits_splits.train
    n = len(clean)
    sources = torch.arange(n) % 3
    y = clean.y.clone()
    bad = sources == 2  # this source relabels a third of its samples
    flip = bad & (torch.arange(n) % 9 < 6)
    y[flip] = (y[flip] + 3) % 10
    from safedl.data.dataset import PoisonedDataset

    p = PoisonedDataset.from_clean(clean, x=clean.x, y=y)
    res = registry.create("cleanser", "provenance_tracking", eps=0.01).find_poison(
        p, trusted=digits_splits.val, sources=sources, train_fn=lambda d, **kw: fit(digits_splits, d, epochs=10))
    assert res.info["flagged_sources"] == [2]
    assert torch.equal(res.is_suspect, bad)


def test_per_source_roni_rejects_the_poisoning_source(digits_splits, tiny_model):
    from safedl.data.dataset import PoisonedDataset

    clean = digits_splits.train
    n = len(clean)
    sources = torch.arange(n) % 6
    y = clean.y.clone()
    flip = (sources == 4) & (torch.arange(n) % 18 < 15)  # source 4 relabels most of what it contributes
    y[flip] = (y[flip] + 3) % 10
    p = PoisonedDataset.from_clean(clean, x=clean.x, y=y)
    res = registry.create("cleanser", "roni", depth=0, epochs=3, base_epochs=15, lr=3e-3).find_poison(
        p, model=tiny_model, trusted=digits_splits.val, sources=sources)
    assert res.info["trainings"] == 6
    assert torch.equal(res.is_suspect, sources == 4)
    with pytest.raises(ConfigError, match="trusted"):
        registry.create("cleanser", "roni").find_poison(p, model=tiny_model)
