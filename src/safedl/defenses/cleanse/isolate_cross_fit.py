"""Superimposition + early-loss isolation, then a cross-fitted label check: poison found with no trusted data and
no known poison rate.

Our own variant; it builds on STRIP (Gao et al., ACSAC 2019: a triggered input keeps its prediction when
superimposed with other images), Anti-Backdoor Learning (Li et al., NeurIPS 2021: poisons separate from clean samples
by their training loss in the first epochs, and an isolated suspect set is removed) and confident learning
(Northcutt, Jiang & Chuang, JAIR 2021: judge each label by out-of-sample predicted probabilities). It does not
implement SPECTRE's robust covariance (Hayase et al. 2021).

1. **Isolation**, two rankings whose union is the suspect set S (at most ``max_class_superimposed`` of any class):
   a. *superimposition* (STRIP run on the training set, ``superimposition.py``): each sample is superimposed with
      ``n_overlays`` training samples of other labels and the model trained on the data (``model``; trained with
      ``train_fn`` when None) predicts each blend; the ``superimposition_fraction`` with the lowest mean entropy
      (at most ``max_class_superimposed`` of a class) are isolated. A patch, pixel or blended trigger survives the
      blend, so its poisons have the lowest entropies even when they are most of their class: this ranking does not
      assume poisons are a minority (digits seed 0, 10% checkerboard / 20% blended to class 3: 126 of 126 and 246
      of 251 poisons among the 251 isolated).
   b. *early loss* (ABL's loss dynamics): a fresh seeded model is trained with ``train_fn`` until four in five
      classes reach ``isolation_fit`` training accuracy (at most ``isolation_epochs`` epochs); each sample's
      cross-entropy is averaged over those epochs and the ``isolation_fraction`` with the *highest* early loss (at
      most ``max_class_isolated`` of a class) are isolated: with the small models measured here, blended-noise and
      random-position poisons are learned slowest (``loss_direction="low"``: ABL's direction).
2. **Cross-fitting**: the data are split into ``n_folds`` stratified folds; for each fold a model is trained on the
   other folds minus S, and the fold's samples are scored by it. No sample is scored by a model that saw it; when S
   holds (almost) all the poison the models do not learn the trigger and judge each image by its content.
3. **Decision**: a sample is *rejected* when the out-of-sample probability of its label is below ``p_threshold``.
   A class is judged poisoned when at least ``min_class_share`` of it is rejected and either (a) at least
   ``min_superimposed_share`` of the class was isolated by superimposition and at least
   ``min_superimposed_rejected`` of those are rejected, or (b) at least ``min_isolated_rejected`` of its
   early-loss isolated samples are: a poison's content is another class's, so models that never saw the trigger
   reject it, while a clean mode of a class, even one removed into S, is rejected only in part. In a poisoned class
   every sample whose out-of-sample label probability is below ``flag_threshold`` is flagged; the score is
   ``1 - p(label)``. With ``rounds`` > 1 the flagged samples join S and steps 2-3 run again (poisons left in
   training in round 1 can teach the cross-fitted models the trigger).

Defaults chosen on digits seed 0 (tiny_cnn); measured on seeds 1-2 in
bench/results/poison_generalization_untrusted2.jsonl (``bench/measure_poison_generalization.py --extra
isolate_cross_fit``). Cost: the superimposition pass (``n_overlays`` forward passes per sample), the isolation
epochs on all data and ``rounds x n_folds`` trainings on ``(n_folds - 1)/n_folds`` of the data less S, beside the
model trained on the data (``time_vs_baseline`` in the bench, not counting that model). Label-consistent poison
(correct labels) is out of reach of step 3 by construction.
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
from safedl.defenses.cleanse.superimposition import superimposition_scores
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

    inputs: ClassVar[frozenset[str]] = frozenset({"model", "train_fn"})
    trusted_data: ClassVar[str] = "unused"
    trusted_role: ClassVar[str] = "not used: no trusted data and no known poison rate"
    known_weak: ClassVar[dict[str, str]] = {
        "any": "when the superimposition ranking misses part of the poison the cross-fitted models learn the trigger "
               "from the rest and nothing is found: digits (tiny_cnn) all-to-one to class 3, checkerboard 20% seeds "
               "1 and 2 TPR 0.000 (n=251, ASR left 1.000), single pixel 20% seed 1 0.000 (ASR 0.783), blended "
               "noise 5% and random patch 5% seed 1 0.000 (n=63), random patch 10% seed 2 0.000 (n=126), "
               "checkerboard 5% seed 2 0.810 (ASR left 0.211); a clean mode of class 1 judged poisoned at seed 2 (checkerboard 10%: "
               "TPR 0.563, FPR 0.067, the whole-mode safeguard fires); in a mostly isolated class clean samples are "
               "flagged too (seed 2 blended 10% / 5%: FPR 0.094 / 0.091) "
               "(bench/measure_poison_generalization.py --trusted none --extra isolate_cross_fit, "
               "bench/results/poison_generalization_untrusted2.jsonl)",
    }

    def __init__(self, *, isolation_epochs: int = 100, isolation_fit: float = 0.8, isolation_fraction: float = 0.2,
                 loss_direction: str = "high", max_class_isolated: float = 0.5, n_folds: int = 2,
                 p_threshold: float = 0.1, min_class_share: float = 0.05, min_isolated_rejected: float = 0.8,
                 superimposition_fraction: float = 0.2, n_overlays: int = 16, blend: str = "max", min_superimposed_rejected: float = 0.5,
                 min_superimposed_share: float = 0.2, max_class_superimposed: float = 0.8, flag_threshold: float = 0.5,
                 rounds: int = 2, seed: int = 0):
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
        self.superimposition_fraction = check_range(self, "superimposition_fraction", superimposition_fraction,
                                                    low=0.0, high=0.9)
        self.n_overlays = check_range(self, "n_overlays", n_overlays, low=1, high=256, integer=True)
        self.min_superimposed_rejected = check_range(self, "min_superimposed_rejected", min_superimposed_rejected,
                                                     low=0.0, high=1.0)
        self.min_superimposed_share = check_range(self, "min_superimposed_share", min_superimposed_share, low=0.0,
                                                  high=1.0)
        self.max_class_superimposed = check_range(self, "max_class_superimposed", max_class_superimposed, low=0.0,
                                                  high=1.0)
        self.flag_threshold = check_range(self, "flag_threshold", flag_threshold, low=0.0, high=1.0,
                                          low_inclusive=False)
        self.blend = check_choice(self, "blend", blend, ("max", "add"))
        self.rounds = check_range(self, "rounds", rounds, low=1, high=5, integer=True)
        self.seed = check_range(self, "seed", seed, low=0, integer=True)

    def suspects(self, losses: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        """The early-loss isolated set: the ``isolation_fraction`` of samples with the highest (or lowest) early loss,
        at most ``max_class_isolated`` of any one class (so the cross-fitted models still see every class)."""
        return self.isolate([(losses, self.loss_direction == "high", self.isolation_fraction,
                              self.max_class_isolated)], y)

    def isolate(self, rankings: list[tuple[torch.Tensor, bool, float, float]], y: torch.Tensor) -> np.ndarray:
        """Union of isolated sets, one per ``(score, descending, fraction, class_cap)``: the ``fraction`` of samples
        ranked first by ``score``, at most ``class_cap`` of any one class, and the union at most
        ``max_class_superimposed`` of any class (filled in order)."""
        yy = y.numpy()
        size = {c: int((y == c).sum()) for c in torch.unique(y).tolist()}
        total = {c: int(self.max_class_superimposed * n) for c, n in size.items()}
        s = np.zeros(len(y), dtype=bool)
        for score, descending, fraction, class_cap in rankings:
            budget = int(round(fraction * len(y)))
            cap = {c: int(class_cap * n) for c, n in size.items()}
            for i in torch.argsort(score, descending=descending).numpy():
                if budget <= 0:
                    break
                c = int(yy[i])
                if cap[c] > 0 and (s[i] or total[c] > 0):
                    total[c] -= 0 if s[i] else 1
                    s[i] = True
                    cap[c] -= 1
                    budget -= 1
        return s

    def decide(self, data: Dataset, prob: torch.Tensor, by_loss_set: np.ndarray,
               superimposed: np.ndarray) -> tuple[np.ndarray, list[dict], list[int]]:
        """Flags, per-class facts and poisoned classes from the cross-fitted label probabilities (step 3)."""
        reject = (prob < self.p_threshold).numpy()
        doubt = (prob < self.flag_threshold).numpy()
        per_class, poisoned = [], []
        flag = np.zeros(len(data), dtype=bool)
        for c in range(data.num_classes):
            in_c = data.y.numpy() == c
            n_c, r_c = int(in_c.sum()), int((reject & in_c).sum())
            share = r_c / n_c if n_c else 0.0
            n_iso, n_sup = int((by_loss_set & in_c).sum()), int((superimposed & in_c).sum())
            iso_share = int((reject & by_loss_set & in_c).sum()) / n_iso if n_iso else 0.0
            sup_share = int((reject & superimposed & in_c).sum()) / n_sup if n_sup else 0.0
            by_loss = iso_share >= self.min_isolated_rejected
            by_sup = n_sup >= self.min_superimposed_share * n_c and sup_share >= self.min_superimposed_rejected
            hit = share >= self.min_class_share and r_c > 0 and (by_loss or by_sup)
            if hit:
                flag |= doubt & in_c
                poisoned.append(c)
            per_class.append({"class": c, "n": n_c, "rejected": r_c, "share": round(share, 4), "poisoned": hit,
                              "isolated": n_iso, "isolated_rejected": round(iso_share, 4), "superimposed": n_sup,
                              "superimposed_rejected": round(sup_share, 4)})
        return flag, per_class, poisoned

    def find_poison(self, data: Dataset, *, model: nn.Module | None = None, trusted: Dataset | None = None,
                    train_fn: TrainFn | None = None, device: str | torch.device = "cpu",
                    losses: torch.Tensor | None = None) -> DetectionResult:
        """``losses`` (N): early losses if already recorded; otherwise ``train_fn`` trains the isolation model.
        ``model`` (trained on ``data``) is superimposed for the entropy isolation (trained with ``train_fn`` when
        None and ``superimposition_fraction`` > 0); ``trusted`` is not used."""
        if train_fn is None:
            raise ConfigError("isolate_cross_fit: needs train_fn (it trains its own isolation and cross-fitted "
                              "models; a model trained on all the data has learned the trigger)")
        epochs = None
        if losses is None:
            losses, epochs = early_losses(data, train_fn, max_epochs=self.isolation_epochs, fit=self.isolation_fit)
        rankings = [(losses.float().cpu(), self.loss_direction == "high", self.isolation_fraction,
                     self.max_class_isolated)]
        superimposed = np.zeros(len(data), dtype=bool)
        if self.superimposition_fraction > 0:
            model = model if model is not None else train_fn(data)
            ent = superimposition_scores(model, data.x, data.y, n_overlays=self.n_overlays, blend=self.blend,
                                         seed=self.seed)["score"]
            rankings.insert(0, (ent, False, self.superimposition_fraction, self.max_class_superimposed))
            superimposed = self.isolate(rankings[:1], data.y.cpu())
        by_loss = self.isolate(rankings[-1:], data.y.cpu())
        sus = self.isolate(rankings, data.y.cpu())
        isolated = [int(sus.sum())]
        for r in range(self.rounds):
            prob = cross_fit_label_probability(data, train_fn, suspects=sus, n_folds=self.n_folds,
                                               seed=self.seed + r)
            flag, per_class, poisoned = self.decide(data, prob, by_loss, superimposed)
            if r + 1 == self.rounds or not (flag & ~sus).any():
                break
            sus = sus | flag  # what round r flagged stays out of the next round's trainings
            isolated.append(int(sus.sum()))
        info = {"isolated": isolated[0], "isolated_per_round": isolated, "isolation_epochs": epochs,
                "loss_direction": self.loss_direction, "superimposition_fraction": self.superimposition_fraction,
                "p_threshold": self.p_threshold, "n_folds": self.n_folds, "rounds_run": len(isolated),
                "per_class": per_class, "poisoned_classes": poisoned}
        return DetectionResult(torch.from_numpy(flag), 1.0 - prob, info)
