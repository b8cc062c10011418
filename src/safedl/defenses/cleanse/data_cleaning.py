"""Loss-based data cleaning with cross-validated losses (the confident-learning idea of scoring every sample
out-of-sample: Northcutt, Jiang & Chuang, JAIR 2021; loss filtering as in e.g. Han et al. 2018).

The data are split into ``n_folds`` stratified folds; for each fold a fresh model is trained (``train_fn``) on the
other folds and computes the cross-entropy of the held-out samples, so no sample is scored by a model that saw it.
``method="loss_filtering"`` flags losses above ``threshold x mean loss``; ``method="outlier_detection"`` flags
z-scores of the loss above ``threshold``.
"""
from __future__ import annotations

from typing import ClassVar

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from safedl.data.dataset import Dataset
from safedl.defenses.cleanse._common import TrainFn
from safedl.defenses.cleanse.result import DetectionResult
from safedl.errors import ConfigError
from safedl.registry import register
from safedl.utils.tensors import predict_logits
from safedl.utils.validate import check_choice, check_positive, check_range

log = logging.getLogger(__name__)


def cross_validated_losses(data: Dataset, train_fn: TrainFn, *, n_folds: int, seed: int) -> torch.Tensor:
    """Per-sample cross-entropy, each computed by a model trained on the other folds (stratified)."""
    from sklearn.model_selection import StratifiedKFold

    y = data.y.numpy()
    counts = np.bincount(y)
    splitter = StratifiedKFold(n_folds, shuffle=True, random_state=seed) if counts[counts > 0].min() >= n_folds else None
    if splitter is None:
        from sklearn.model_selection import KFold

        splitter = KFold(n_folds, shuffle=True, random_state=seed)
    losses = torch.full((len(data),), float("nan"))
    for k, (tr, te) in enumerate(splitter.split(np.zeros(len(y)), y)):
        log.info("data_cleaning: fold %d/%d", k + 1, n_folds)
        m = train_fn(data.subset(torch.from_numpy(tr)))
        te_t = torch.from_numpy(te)
        logits = predict_logits(m, data.x[te_t]).cpu()
        losses[te_t] = F.cross_entropy(logits, data.y[te_t], reduction="none")
    return losses


@register("cleanser", "data_cleaning")
class DataCleaning:
    """Flag samples with high cross-validated loss (scaled-mean threshold or loss z-score)."""

    inputs: ClassVar[frozenset[str]] = frozenset({"train_fn"})
    trusted_data: ClassVar[str] = "unused"
    trusted_role: ClassVar[str] = "not used: losses come from cross-validated models"
    known_weak: ClassVar[dict[str, str]] = {}

    def __init__(self, *, method: str = "loss_filtering", threshold: float | None = None, n_folds: int = 4,
                 seed: int = 0):
        self.method = check_choice(self, "method", method, ("loss_filtering", "outlier_detection"))
        self.threshold = None if threshold is None else check_positive(self, "threshold", threshold)
        self.n_folds = check_range(self, "n_folds", n_folds, low=2, high=20, integer=True)
        self.seed = check_range(self, "seed", seed, low=0, integer=True)

    @property
    def effective_threshold(self) -> float:
        """``threshold``, or when None 2 x mean loss (loss filtering) or 1 standard deviation above the mean."""
        if self.threshold is not None:
            return float(self.threshold)
        return 2.0 if self.method == "loss_filtering" else 1.0

    def find_poison(self, data: Dataset, *, model: nn.Module | None = None, trusted: Dataset | None = None,
                    train_fn: TrainFn | None = None, device: str | torch.device = "cpu",
                    losses: torch.Tensor | None = None) -> DetectionResult:
        """``losses`` (N) may be given if already cross-validated; otherwise ``train_fn`` is required (``model`` is
        not used for scoring: it has memorised its training samples)."""
        if losses is None:
            if train_fn is None:
                raise ConfigError("data_cleaning: needs train_fn to train cross-validated models (a model trained on "
                                  "all the data has memorised the samples it would score)")
            losses = cross_validated_losses(data, train_fn, n_folds=self.n_folds, seed=self.seed)
        losses = losses.float().cpu()
        mean, std = float(losses.mean()), float(losses.std())
        threshold = self.effective_threshold
        if self.method == "loss_filtering":
            cut = threshold * mean
            flag = losses > cut
        else:
            cut = mean + threshold * std
            flag = (losses - mean) / max(std, 1e-12) > threshold
        return DetectionResult(flag, losses, {"method": self.method, "threshold": threshold, "cutoff_loss": cut,
                                              "mean_loss": mean, "std_loss": std, "n_folds": self.n_folds})
