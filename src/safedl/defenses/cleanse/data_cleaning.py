"""Loss-based data cleaning with cross-validated losses (the confident-learning idea of scoring every sample
out-of-sample: Northcutt, Jiang & Chuang, JAIR 2021; loss filtering as in e.g. Han et al. 2018).

The data are split into ``n_folds`` stratified folds; for each fold a fresh model is trained (``train_fn``) on the
other folds and computes the cross-entropy of the held-out samples, so no sample is scored by a model that saw it.
``method="loss_filtering"`` flags losses above ``threshold x mean loss``; ``method="outlier_detection"`` flags
z-scores of the loss above ``threshold``.

``granularity`` (Safe-DL's name): ``"sample"`` (default) judges each sample; ``"batch"`` (our variant, for data that
arrive in batches from one provenance each) judges consecutive runs of ``batch_size`` samples in the data's order
by their mean loss, with the same rule applied to the batch means, and flags a batch as a whole. It finds poison
that arrives together (one bad delivery); poisons scattered through the order dilute every batch mean.
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
                 seed: int = 0, granularity: str = "sample", batch_size: int = 32):
        self.granularity = check_choice(self, "granularity", granularity, ("sample", "batch"))
        self.batch_size = check_range(self, "batch_size", batch_size, low=1, integer=True)
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
        batch = torch.arange(len(losses)) // (self.batch_size if self.granularity == "batch" else 1)
        units = torch.zeros(int(batch.max()) + 1 if len(losses) else 0).index_add_(0, batch, losses)
        units = units / torch.bincount(batch, minlength=len(units)).clamp_min(1)  # per sample, or per batch mean
        mean, std = float(units.mean()), float(units.std()) if len(units) > 1 else 0.0
        threshold = self.effective_threshold
        if self.method == "loss_filtering":
            cut = threshold * mean
            flag_units = units > cut
        else:
            cut = mean + threshold * std
            flag_units = (units - mean) / max(std, 1e-12) > threshold
        info = {"method": self.method, "threshold": threshold, "cutoff_loss": cut, "mean_loss": mean,
                "std_loss": std, "n_folds": self.n_folds, "granularity": self.granularity}
        if self.granularity == "batch":
            info.update(batch_size=self.batch_size, batches=len(units),
                        flagged_batches=torch.nonzero(flag_units).flatten().tolist())
        return DetectionResult(flag_units[batch], units[batch] if self.granularity == "batch" else losses, info)
