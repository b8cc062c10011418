"""In-memory image data sets: float32 N x C x H x W in [0, 1] and int64 labels, plus poisoned sets with ground truth."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from safedl.errors import DataError
from safedl.utils.io import tensor_hash


@dataclass
class Dataset:
    """Images ``x`` (N x C x H x W, float32 in [0, 1]) and labels ``y`` (int64, N)."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str = "data"
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.x.ndim != 4:
            raise DataError(f"{self.name}: images must be N x C x H x W, got shape {tuple(self.x.shape)}")
        if self.y.ndim != 1 or len(self.y) != len(self.x):
            raise DataError(f"{self.name}: {len(self.x)} images but labels of shape {tuple(self.y.shape)}")
        self.x = self.x.float()
        self.y = self.y.long()

    def __len__(self) -> int:
        return len(self.x)

    @property
    def shape(self) -> tuple[int, int, int]:
        """C, H, W."""
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def subset(self, index: torch.Tensor) -> "Dataset":
        """A new data set of the rows in ``index`` (bool mask or int indices)."""
        return Dataset(self.x[index], self.y[index], self.num_classes, self.name, self.class_names)

    def content_hash(self) -> str:
        return tensor_hash(self.x, self.y)

    def class_counts(self) -> list[int]:
        return torch.bincount(self.y, minlength=self.num_classes).tolist()


@dataclass
class PoisonedDataset(Dataset):
    """A training set after a poisoning attack, carrying exact ground truth.

    ``is_poison[i]`` is True exactly for the samples the attack changed (image or label or both);
    ``original_x`` / ``original_y`` hold every sample as it was before the attack; ``info`` records the attack's
    own facts (flip map, trigger, target class, ...).
    """

    is_poison: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    original_x: torch.Tensor | None = None
    original_y: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.original_x is None:
            self.original_x = self.x.clone()
        if self.original_y is None:
            self.original_y = self.y.clone()
        if self.is_poison.numel() == 0 and len(self.x):
            self.is_poison = torch.zeros(len(self.x), dtype=torch.bool)
        if self.is_poison.shape != (len(self.x),) or self.is_poison.dtype != torch.bool:
            raise DataError(f"{self.name}: is_poison must be a bool mask of length {len(self.x)}")

    @classmethod
    def from_clean(cls, clean: Dataset, *, x: torch.Tensor, y: torch.Tensor, info: dict[str, Any] | None = None,
                   name: str | None = None) -> "PoisonedDataset":
        """Build from the clean set and the attacked tensors; the poison mask is derived from what changed."""
        changed = (x != clean.x).flatten(1).any(1) | (y != clean.y)
        return cls(x, y, clean.num_classes, name or f"{clean.name}+poison", clean.class_names,
                   is_poison=changed, original_x=clean.x, original_y=clean.y, info=dict(info or {}))

    @property
    def n_poison(self) -> int:
        return int(self.is_poison.sum())

    @property
    def poison_fraction(self) -> float:
        return self.n_poison / max(1, len(self))

    @property
    def label_changed(self) -> torch.Tensor:
        return self.y != self.original_y

    def subset(self, index: torch.Tensor) -> "PoisonedDataset":  # type: ignore[override]
        return PoisonedDataset(self.x[index], self.y[index], self.num_classes, self.name, self.class_names,
                               is_poison=self.is_poison[index], original_x=self.original_x[index],
                               original_y=self.original_y[index], info=self.info)

    def clean_view(self) -> Dataset:
        return Dataset(self.x, self.y, self.num_classes, self.name, self.class_names)


@dataclass
class Splits:
    """Train / validation / test splits of one data set, with their content hashes."""

    train: Dataset
    val: Dataset
    test: Dataset
    mean: tuple[float, ...]
    std: tuple[float, ...]
    field: Dataset | None = None  # dataset.field_test: a held-out set from the field (data/extra.py)

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.train.shape

    def hashes(self) -> dict[str, str]:
        out = {"train": self.train.content_hash(), "val": self.val.content_hash(), "test": self.test.content_hash()}
        if self.field is not None:
            out["field"] = self.field.content_hash()
        return out
