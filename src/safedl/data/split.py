"""Deterministic stratified train / validation / test splits."""
from __future__ import annotations

import logging

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from safedl.data.dataset import Dataset, Splits
from safedl.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def check_class_counts(data: Dataset, *, val_fraction: float) -> None:
    """Refuse data a classifier cannot honestly be assessed on: fewer than two classes, or a class with too few
    samples for every split to hold it (3 with a validation split, else 2). The message lists every class count."""
    counts = torch.bincount(data.y, minlength=data.num_classes).tolist()
    names = data.class_names or [str(i) for i in range(len(counts))]
    shown = ", ".join(f"{names[i] if i < len(names) else i}: {c}" for i, c in enumerate(counts))
    need = 3 if val_fraction > 0 else 2
    if sum(c > 0 for c in counts) < 2:
        raise DataError(f"{data.name}: {sum(c > 0 for c in counts)} class(es) with samples (class counts: {shown}); "
                        "a classifier needs at least two classes, each with samples")
    few = [names[i] if i < len(names) else str(i) for i, c in enumerate(counts) if c < need]
    if few:
        raise DataError(f"{data.name}: class(es) {', '.join(few)} have fewer than {need} samples, too few for the "
                        f"train/{'validation/' if val_fraction > 0 else ''}test splits (class counts: {shown}); "
                        "add samples, remove the class, or lower val_fraction")


def stratified_split(data: Dataset, *, test_fraction: float, val_fraction: float, seed: int) -> Splits:
    """Split ``data`` stratified by label with a fixed seed; mean/std per channel come from the train split.

    Each split holds every class in proportion (within about one sample per class); indices inside a split keep
    the data set's order, so the same data, fractions and seed always give the same splits and content hashes.
    """
    if not (0.0 < test_fraction < 1.0) or not (0.0 <= val_fraction < 1.0) or test_fraction + val_fraction >= 1.0:
        raise ConfigError(f"{data.name}: test_fraction={test_fraction!r} and val_fraction={val_fraction!r} must satisfy "
                          "0 < test_fraction < 1, 0 <= val_fraction and test_fraction + val_fraction < 1")
    idx = np.arange(len(data))
    y = data.y.numpy()
    check_class_counts(data, val_fraction=val_fraction)
    strat = y
    try:
        rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=strat)
        val_rel = val_fraction / (1.0 - test_fraction)
        if val_fraction > 0:
            train, val = train_test_split(rest, test_size=val_rel, random_state=seed, stratify=y[rest])
        else:
            train, val = rest, rest[:0]
    except ValueError as exc:
        raise DataError(f"{data.name}: cannot split {len(data)} samples ({exc})") from None
    # keep the shuffled order: built-in sets are sorted by class, and "the first n test images" must mix classes
    tr, va, te = (data.subset(torch.from_numpy(np.asarray(i))) for i in (train, val, test))
    mean = tuple(tr.x.mean(dim=(0, 2, 3)).tolist())
    std = tuple(max(s, 1e-3) for s in tr.x.std(dim=(0, 2, 3)).tolist())
    return Splits(tr, va, te, mean, std)
