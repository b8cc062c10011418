"""Planted poison for the defense tests: a BadNets-style 2x2 white patch on 8x8 digits, dirty label, target 7."""
from __future__ import annotations

import torch

from safedl.data.dataset import Dataset, PoisonedDataset
from safedl.models import TrainRecipe, build_model, train_model, with_normalization
from safedl.utils.tensors import predict, seed_everything

TARGET = 7


def trigger(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, :, -2:, -2:] = 1.0
    return x


def plant_backdoor(train: Dataset, frac: float, *, seed: int = 0) -> PoisonedDataset:
    g = torch.Generator().manual_seed(seed)
    cand = torch.nonzero(train.y != TARGET).flatten()
    pick = cand[torch.randperm(len(cand), generator=g)[: int(round(frac * len(train)))]]
    x, y = train.x.clone(), train.y.clone()
    x[pick] = trigger(x[pick])
    y[pick] = TARGET
    return PoisonedDataset.from_clean(train, x=x, y=y)


def plant_flips(train: Dataset, frac: float, *, seed: int = 0) -> PoisonedDataset:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train), generator=g)[: int(round(frac * len(train)))]
    y = train.y.clone()
    y[idx] = (y[idx] + torch.randint(1, train.num_classes, (len(idx),), generator=g)) % train.num_classes
    return PoisonedDataset.from_clean(train, x=train.x, y=y)


def fresh(splits, seed: int = 0):
    seed_everything(seed)
    return with_normalization(build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8), splits.mean, splits.std)


RECIPE = TrainRecipe(epochs=15, batch_size=64, lr=3e-3, augment="none")


def fit(splits, data: Dataset, *, epochs: int = 15, seed: int = 0, **kw):
    m = fresh(splits, seed)
    train_model(m, data, recipe=RECIPE.model_copy(update={"epochs": epochs}), seed=seed, **kw)
    return m.eval()


def asr(model, splits) -> float:
    xt = trigger(splits.test.x[splits.test.y != TARGET])
    return float((predict(model, xt) == TARGET).float().mean())


def acc(model, data: Dataset) -> float:
    return float((predict(model, data.x) == data.y).float().mean())


def rates(flag: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    tpr = float((flag & truth).sum()) / max(1, int(truth.sum()))
    fpr = float((flag & ~truth).sum()) / max(1, int((~truth).sum()))
    return tpr, fpr
