"""``dataset.extra``: more labelled training data (e.g. a review queue's export) added to the training split of a
data set after it was split, so validation, test and the normalization statistics stay those of the base data."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from safedl.data.dataset import Dataset, Splits
from safedl.data.loaders import load_npz
from safedl.errors import DataError

log = logging.getLogger(__name__)


def _resolve(path: str, base_dir: Path) -> Path:
    q = Path(path).expanduser()
    return q if q.is_absolute() else base_dir / q


def load_extra(spec, *, shape: tuple[int, int, int], num_classes: int, base_dir: Path,
               index: int | None) -> Dataset:
    """One ``dataset.extra`` entry (``index`` None: ``dataset.field_test``), checked against the base data set's
    image shape and classes."""
    path = _resolve(spec.path, Path(base_dir))
    data = load_npz(path)
    where = f"dataset.field_test {path}" if index is None else f"dataset.extra[{index}] {path}"
    if len(data) == 0:
        raise DataError(f"{where}: holds no images")
    if tuple(data.shape) != tuple(shape):
        raise DataError(f"{where}: images of shape {list(data.shape)}; the data set's are {list(shape)} (C, H, W)")
    if int(data.y.max()) >= num_classes:
        raise DataError(f"{where}: label {int(data.y.max())} is not a class of the data set (0..{num_classes - 1})")
    return data


def with_extra(splits: Splits, specs: list, *, base_dir: Path) -> Splits:
    """``splits`` with every ``dataset.extra`` file appended to its training split (the others unchanged)."""
    if not specs:
        return splits
    train = splits.train
    parts_x, parts_y = [train.x], [train.y]
    for i, spec in enumerate(specs):
        extra = load_extra(spec, shape=splits.shape, num_classes=splits.num_classes, base_dir=base_dir, index=i)
        parts_x.append(extra.x)
        parts_y.append(extra.y)
        log.info("dataset.extra[%d]: %d images added to the training split (%s)", i, len(extra), spec.path)
    grown = Dataset(torch.cat(parts_x), torch.cat(parts_y), train.num_classes, train.name, train.class_names)
    return dataclasses.replace(splits, train=grown)


def with_field_test(splits: Splits, spec, *, base_dir: Path) -> Splits:
    """``splits`` with ``dataset.field_test`` (None: unchanged) as its held-out field set."""
    if spec is None:
        return splits
    field = load_extra(spec, shape=splits.shape, num_classes=splits.num_classes, base_dir=base_dir,
                       index=None)
    return dataclasses.replace(splits, field=field)
