"""The one training loop used by every stage (baseline, poisoned retraining, robust training, fine-tuning)."""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from safedl.data.dataset import Dataset
from safedl.errors import ConfigError, DataError
from safedl.utils.progress import progress_bar
from safedl.utils.tensors import eval_mode, predict

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


class FinetuneSpec(BaseModel):
    """How ``training.mode: finetune`` fine-tunes: passes, learning rate and the share of clean samples replayed."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=1, le=1000, description="passes over the new samples (and the replayed ones)")
    lr: Optional[float] = Field(None, gt=0, le=10, description="learning rate (None: the recipe's lr)")
    replay_fraction: float = Field(0.0, ge=0, le=1, description="share of the clean training samples replayed "
                                                                 "beside the new ones (0: the new samples only)")


class TrainRecipe(BaseModel):
    """A training recipe. Attacked and defended models reuse the baseline's recipe exactly."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(8, ge=1, le=1000, description="passes over the training set")
    batch_size: int = Field(64, ge=1, le=65536)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0, le=1)
    schedule: Literal["constant", "cosine", "step", "onecycle"] = "onecycle"
    augment: Literal["none", "shift"] = Field("shift", description="'shift': random translations of up to shift_pixels")
    shift_pixels: int = Field(2, ge=0, le=8)
    early_stopping_patience: Optional[int] = Field(None, ge=1, description="epochs without val improvement before stopping")
    mode: Literal["scratch", "finetune"] = Field("scratch", description="how a poisoned model is made: 'scratch' "
                                                 "retrains like the baseline, 'finetune' fine-tunes the clean model "
                                                 "(or model.checkpoint) on the new (poisoned) samples only")
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)


@dataclass
class TrainReport:
    epochs_run: int
    time_s: float
    history: list[dict] = field(default_factory=list)
    best_val_accuracy: float | None = None


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift], zero-filled, in one batched op."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator).to(x.device)
    pad = F.pad(x, (max_shift,) * 4)
    rows = (torch.arange(h, device=x.device).view(1, h) + max_shift - shifts[:, :1])  # N x H
    cols = (torch.arange(w, device=x.device).view(1, w) + max_shift - shifts[:, 1:])  # N x W
    idx_r = rows.view(n, 1, h, 1).expand(n, x.shape[1], h, pad.shape[-1])
    out = pad.gather(2, idx_r)
    idx_c = cols.view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    return out.gather(3, idx_c)


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def accuracy(model: nn.Module, data: Dataset, *, device: torch.device | None = None, batch_size: int = 512) -> float:
    if len(data) == 0:
        return float("nan")
    x = data.x if device is None else data.x.to(device)
    pred = predict(model, x, batch_size=batch_size).cpu()
    return float((pred == data.y).float().mean())


def _scheduler(opt: torch.optim.Optimizer, recipe: TrainRecipe, steps_per_epoch: int):
    total = recipe.epochs * steps_per_epoch
    if recipe.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if recipe.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, total // 3), gamma=0.1)
    if recipe.schedule == "onecycle":
        if total < 4:  # one-cycle needs a warm-up and an annealing phase of at least two steps each
            log.warning("onecycle schedule over %d optimizer steps is too short; training at a constant lr", total)
            return None
        # the warm-up must span at least two steps (torch divides by its length); 20% once there are >= 10
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=total,
                                                   pct_start=max(0.2, 2 / total))
    return None


def make_optimizer(params, recipe: TrainRecipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


def train_model(
    model: nn.Module,
    train: Dataset,
    *,
    recipe: TrainRecipe,
    seed: int,
    val: Dataset | None = None,
    device: torch.device | str = "cpu",
    loss_fn: LossFn | None = None,
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
    description: str = "training",
    sample_weight: torch.Tensor | None = None,
) -> TrainReport:
    """Train ``model`` in place with ``recipe``; shuffling and augmentation use a generator seeded by ``seed``.

    ``loss_fn(model, x, y)`` replaces cross-entropy (adversarial training, robust losses). With early stopping the
    weights of the best validation epoch are restored. ``sample_weight`` (N) weights the per-sample CE loss.
    """
    device = torch.device(device)
    n = len(train)
    _check_inputs(train, sample_weight, loss_fn)
    model.to(device)
    g = torch.Generator().manual_seed(int(seed))
    steps = max(1, (n + recipe.batch_size - 1) // recipe.batch_size)
    opt = make_optimizer(model.parameters(), recipe)
    sched = _scheduler(opt, recipe, steps)
    x_all, y_all = train.x.to(device), train.y.to(device)
    w_all = None if sample_weight is None else sample_weight.to(device).float()
    report = TrainReport(0, 0.0)
    best_acc, best_state, stale = -1.0, None, 0
    t0 = time.perf_counter()
    with progress_bar(recipe.epochs * steps, description) as bar:
        for epoch in range(recipe.epochs):
            total_loss = _train_epoch(model, x_all, y_all, w_all, recipe=recipe, opt=opt, sched=sched, g=g,
                                      steps=steps, loss_fn=loss_fn, advance=bar.advance)
            entry = {"epoch": epoch + 1, "loss": total_loss / n}
            if val is not None and len(val):
                with eval_mode(model):
                    entry["val_accuracy"] = accuracy(model, val, device=device)
            report.history.append(entry)
            report.epochs_run = epoch + 1
            log.debug("%s epoch %d: %s", description, epoch + 1, entry)
            if on_epoch_end is not None:
                on_epoch_end(epoch, model)
            if recipe.early_stopping_patience and "val_accuracy" in entry:
                if entry["val_accuracy"] > best_acc:
                    best_acc, stale = entry["val_accuracy"], 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    stale += 1
                    if stale >= recipe.early_stopping_patience:
                        break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    report.time_s = time.perf_counter() - t0
    if val is not None and len(val):
        report.best_val_accuracy = accuracy(model, val, device=device)
    return report


def _check_inputs(train: Dataset, sample_weight: torch.Tensor | None, loss_fn: LossFn | None) -> None:
    """A non-empty training set; ``sample_weight``: one finite weight >= 0 per sample, never with ``loss_fn``."""
    n = len(train)
    if n == 0:
        raise DataError(f"{train.name}: the training set is empty")
    if sample_weight is not None:
        if sample_weight.shape != (n,):
            raise ConfigError(f"sample_weight must have shape ({n},) like the training set, got {tuple(sample_weight.shape)}")
        if not bool(torch.isfinite(sample_weight).all()) or bool((sample_weight < 0).any()):
            raise ConfigError("sample_weight must be finite and >= 0")
        if loss_fn is not None:
            raise ConfigError("sample_weight and loss_fn cannot be combined: a custom loss_fn does its own weighting")


def _train_epoch(model: nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, w_all: torch.Tensor | None, *,
                 recipe: TrainRecipe, opt: torch.optim.Optimizer, sched, g: torch.Generator, steps: int,
                 loss_fn: LossFn | None, advance: Callable[[int], None]) -> float:
    """One pass over the shuffled training set (shuffle, then per batch the shift augmentation, from ``g``); returns
    the summed loss (sum over batches of mean batch loss times batch size)."""
    n = len(x_all)
    model.train()
    perm = torch.randperm(n, generator=g).to(x_all.device)
    total_loss = 0.0
    for i in range(steps):
        idx = perm[i * recipe.batch_size : (i + 1) * recipe.batch_size]
        xb, yb = x_all[idx], y_all[idx]
        if recipe.augment == "shift":
            xb = random_shift(xb, recipe.shift_pixels, g)
        if loss_fn is not None:
            loss = loss_fn(model, xb, yb)
        elif w_all is not None:
            loss = (F.cross_entropy(model(xb), yb, reduction="none") * w_all[idx]).sum() / w_all[idx].sum().clamp_min(1e-12)
        else:
            loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        total_loss += float(loss.detach()) * len(idx)
        advance(1)
    return total_loss
