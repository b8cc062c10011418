"""Early-loss isolation + cross-fitted label check: finds poison with no trusted data and no known poison rate.

Our own variant; it builds on Anti-Backdoor Learning (Li et al., NeurIPS 2021: poisons separate from clean samples
by their training loss in the first epochs, and an isolated suspect set is removed) and on confident learning
(Northcutt, Jiang & Chuang, JAIR 2021: judge each label by out-of-sample predicted probabilities). It does not
implement SPECTRE's robust covariance (Hayase et al. 2021).

1. **Isolation** (ABL's loss dynamics): a fresh seeded model is trained with ``train_fn`` until four in five
   classes reach ``isolation_fit`` training accuracy (at most ``isolation_epochs`` epochs); each sample's
   cross-entropy is recorded after every epoch and averaged. ABL isolates the samples learned *fastest* (lowest
   loss); with the small models measured here dirty-label poisons with a blended or noise trigger are learned
   *slowest* (their content belongs to other classes until the trigger is memorised), so by default the
   ``isolation_fraction`` of samples with the *highest* early loss, at most ``max_class_isolated`` of any class,
   form the suspect set S (``loss_direction="low"``: ABL's direction).
2. **Cross-fitting**: the data are split into ``n_folds`` stratified folds; for each fold a model is trained on the
   other folds minus S, and the fold's samples are scored by it. No sample is scored by a model that saw it; when S
   holds most of the poison the models do not learn the trigger and judge each image by its content (when it does
   not, e.g. a patch learned as fast as clean content, they learn it and nothing is found: ``known_weak``).
3. **Decision**: a sample is *rejected* when the out-of-sample probability of its label is below ``p_threshold``.
   A class is judged poisoned when at least ``min_class_share`` of it is rejected and at least
   ``min_isolated_rejected`` of its isolated samples are: a poison's content is another class's, so models that
   never saw it reject it almost always, while a hard but clean mode of a class (removed into S with its class)
   is rejected only in part (digits seeds 1-2, bench/results/poison_generalization_untrusted.jsonl: 0.81-0.98
   of the target class's isolated samples rejected where poison was found; up to 1.0 in a clean class of a few
   isolated samples, so the ``min_class_share`` condition is needed too). Only rejected samples of poisoned
   classes are flagged; the score is ``1 - p(label)``.

Cost: the isolation epochs on all data plus ``n_folds`` trainings on ``(n_folds - 1)/n_folds`` of the data less S
(0.3-1.8 baseline trainings in the digits grid cells, ``time_vs_baseline``). Label-consistent poison (correct
labels) is out of reach of step 3 by construction.
"""
from __future__ import annotations

import logging
from typing import ClassVar

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
from safedl.utils.validate import check_choice, check_range

log = logging.getLogger(__name__)


class IsolationDone(Exception):
    """Raised from the epoch callback to end the isolation training after ``isolation_epochs`` epochs."""


def early_losses(data: Dataset, train_fn: TrainFn, *, max_epochs: int, fit: float) -> tuple[torch.Tensor, int]:
    """Per-sample cross-entropy averaged over the epochs of a training with ``train_fn`` up to the first epoch at
    which four in five classes (the 20th percentile of per-class training accuracy) reach ``fit`` (or ``max_epochs``); also that epoch count."""
    rows: list[torch.Tensor] = []
    classes = torch.unique(data.y)

    def record(epoch: int, model: nn.Module) -> None:
        logits = predict_logits(model, data.x).cpu()
        rows.append(F.cross_entropy(logits, data.y, reduction="none").detach())
        hit = logits.argmax(1) == data.y
        acc = torch.stack([hit[data.y == c].float().mean() for c in classes])
        if len(rows) >= max_epochs or float(acc.quantile(0.2)) >= fit:
            raise IsolationDone

    try:
        train_fn(data, on_epoch_end=record)
    except IsolationDone:
        pass
    return torch.stack(rows).mean(0), len(rows)


def stratified_folds(y: torch.Tensor, *, n_folds: int, seed: int) -> np.ndarray:
    """Fold number of every sample: each class shuffled with ``seed`` and dealt round-robin over the folds."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(y), dtype=np.int64)
    for c in torch.unique(y).tolist():
        idx = np.nonzero(y.numpy() == c)[0]
        fold[rng.permutation(idx)] = np.arange(len(idx)) % n_folds
    return fold


def cross_fit_label_probability(data: Dataset, train_fn: TrainFn, *, suspects: np.ndarray, n_folds: int,
                                seed: int) -> torch.Tensor:
    """Out-of-sample probability of each sample's label: fold k is scored by a model trained on the other folds
    without the ``suspects``."""
    fold = stratified_folds(data.y, n_folds=n_folds, seed=seed)
    prob = torch.full((len(data),), float("nan"))
    for k in range(n_folds):
        train_idx = np.nonzero((fold != k) & ~suspects)[0]
        log.info("isolate_cross_fit: fold %d/%d, training on %d samples", k + 1, n_folds, len(train_idx))
        model = train_fn(data.subset(torch.from_numpy(train_idx)))
        te = torch.from_numpy(np.nonzero(fold == k)[0])
        p = F.softmax(predict_logits(model, data.x[te]).cpu().float(), dim=1)
        prob[te] = p.gather(1, data.y[te].view(-1, 1)).flatten()
    return prob


@register("cleanser", "isolate_cross_fit")
class IsolateCrossFit:
    """Isolate high early-loss samples, then flag labels that models trained without them reject (own variant of
    ABL, Li et al. 2021, with confident learning's out-of-sample check, Northcutt et al. 2021)."""

    inputs: ClassVar[frozenset[str]] = frozenset({"train_fn"})
    trusted_data: ClassVar[str] = "unused"
    trusted_role: ClassVar[str] = "not used: no trusted data and no known poison rate"
    known_weak: ClassVar[dict[str, str]] = {
        "any": "a trigger learned as fast as clean content (a checkerboard patch) is not isolated by high early loss, "
               "the cross-fitted models learn it from the remaining poison and nothing is found: digits 10% "
               "checkerboard to class 3, seeds 1 and 2, and before the split: TPR 0.000 (n=126; ASR left 0.99-1.00); "
               "blended noise 10%: TPR 0.865 / 0.492 (seeds 1 / 2, n=126), 0.832 before the split (n=125); "
               "(bench/measure_poison_generalization.py --extra isolate_cross_fit, "
               "bench/results/poison_generalization_untrusted.jsonl)",
        "trigger:single_pixel": "digits 10% single pixel to class 3: seed 1 TPR 0.643 (n=126); seed 2 TPR 0.000 and a "
                                "clean mode of class 1 flagged instead (28 of 109 samples, FPR 0.025, clean accuracy "
                                "0.939 -> 0.903; bench/results/poison_generalization_untrusted.jsonl)",
    }

    def __init__(self, *, isolation_epochs: int = 100, isolation_fit: float = 0.8, isolation_fraction: float = 0.2,
                 loss_direction: str = "high", max_class_isolated: float = 0.5, n_folds: int = 2,
                 p_threshold: float = 0.1, min_class_share: float = 0.05, min_isolated_rejected: float = 0.8,
                 seed: int = 0):
        self.isolation_epochs = check_range(self, "isolation_epochs", isolation_epochs, low=1, high=100, integer=True)
        self.isolation_fit = check_range(self, "isolation_fit", isolation_fit, low=0.0, high=1.0)
        self.isolation_fraction = check_range(self, "isolation_fraction", isolation_fraction, low=0.0, high=0.9)
        self.loss_direction = check_choice(self, "loss_direction", loss_direction, ("high", "low"))
        self.max_class_isolated = check_range(self, "max_class_isolated", max_class_isolated, low=0.0, high=1.0)
        self.n_folds = check_range(self, "n_folds", n_folds, low=2, high=10, integer=True)
        self.p_threshold = check_range(self, "p_threshold", p_threshold, low=0.0, high=1.0, low_inclusive=False)
        self.min_class_share = check_range(self, "min_class_share", min_class_share, low=0.0, high=1.0)
        self.min_isolated_rejected = check_range(self, "min_isolated_rejected", min_isolated_rejected, low=0.0,
                                                 high=1.0)
        self.seed = check_range(self, "seed", seed, low=0, integer=True)

    def suspects(self, losses: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        """The isolated set S: the ``isolation_fraction`` of samples with the highest (or lowest) early loss, at most
        ``max_class_isolated`` of any one class (so the cross-fitted models still see every class)."""
        order = torch.argsort(losses, descending=self.loss_direction == "high").numpy()
        budget = int(round(self.isolation_fraction * len(losses)))
        cap = {c: int(self.max_class_isolated * int((y == c).sum())) for c in torch.unique(y).tolist()}
        s = np.zeros(len(losses), dtype=bool)
        yy = y.numpy()
        for i in order:
            if budget <= 0:
                break
            if cap[int(yy[i])] > 0:
                s[i] = True
                cap[int(yy[i])] -= 1
                budget -= 1
        return s

    def find_poison(self, data: Dataset, *, model: nn.Module | None = None, trusted: Dataset | None = None,
                    train_fn: TrainFn | None = None, device: str | torch.device = "cpu",
                    losses: torch.Tensor | None = None) -> DetectionResult:
        """``losses`` (N): early losses if already recorded; otherwise ``train_fn`` trains the isolation model.
        ``model`` and ``trusted`` are not used."""
        if train_fn is None:
            raise ConfigError("isolate_cross_fit: needs train_fn (it trains its own isolation and cross-fitted "
                              "models; a model trained on all the data has learned the trigger)")
        if losses is None:
            losses, epochs = early_losses(data, train_fn, max_epochs=self.isolation_epochs, fit=self.isolation_fit)
        else:
            epochs = None
        sus = self.suspects(losses.float().cpu(), data.y.cpu())
        prob = cross_fit_label_probability(data, train_fn, suspects=sus, n_folds=self.n_folds, seed=self.seed)
        reject = (prob < self.p_threshold).numpy()
        per_class, poisoned = [], []
        flag = np.zeros(len(data), dtype=bool)
        for c in range(data.num_classes):
            in_c = data.y.numpy() == c
            n_c, r_c = int(in_c.sum()), int((reject & in_c).sum())
            share = r_c / n_c if n_c else 0.0
            n_iso = int((sus & in_c).sum())
            iso_share = int((reject & sus & in_c).sum()) / n_iso if n_iso else 0.0
            hit = share >= self.min_class_share and iso_share >= self.min_isolated_rejected and r_c > 0
            if hit:
                flag |= reject & in_c
                poisoned.append(c)
            per_class.append({"class": c, "n": n_c, "rejected": r_c, "share": round(share, 4), "poisoned": hit,
                              "isolated": n_iso,
                              "isolated_rejected": round(iso_share, 4)})
        info = {"isolated": int(sus.sum()), "isolation_epochs": epochs,
                "loss_direction": self.loss_direction, "p_threshold": self.p_threshold, "n_folds": self.n_folds,
                "per_class": per_class, "poisoned_classes": poisoned}
        return DetectionResult(torch.from_numpy(flag), 1.0 - prob, info)
