"""Deterministic stratified train / validation / test splits."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from safedl.data.dataset import Dataset, Splits
from safedl.errors import DataError


def stratified_split(data: Dataset, *, test_fraction: float, val_fraction: float, seed: int) -> Splits:
    """Split ``data`` stratified by label with a fixed seed; mean/std per channel come from the train split."""
    idx = np.arange(len(data))
    y = data.y.numpy()
    counts = np.bincount(y)
    strat = y if counts[counts > 0].min() >= 3 else None
    try:
        rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=strat)
        val_rel = val_fraction / (1.0 - test_fraction)
        if val_fraction > 0:
            train, val = train_test_split(rest, test_size=val_rel, random_state=seed, stratify=None if strat is None else y[rest])
        else:
            train, val = rest, rest[:0]
    except ValueError as exc:
        raise DataError(f"{data.name}: cannot split {len(data)} samples ({exc})") from None
    tr, va, te = (data.subset(torch.from_numpy(np.sort(i))) for i in (train, val, test))
    mean = tuple(tr.x.mean(dim=(0, 2, 3)).tolist())
    std = tuple(max(s, 1e-3) for s in tr.x.std(dim=(0, 2, 3)).tolist())
    return Splits(tr, va, te, mean, std)
