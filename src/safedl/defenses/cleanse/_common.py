"""Helpers shared by cleansers: the cleanser call contract, penultimate features and the two-mode decision rules.

Cleanser contract (every module in this package)::

    find_poison(data: Dataset, *, model=None, trusted=None, train_fn=None, device="cpu", **extra) -> DetectionResult

- ``model``: a model trained on ``data`` as given (poisoned). Feature-space cleansers (spectral signatures,
  activation clustering, anomaly detection, influence) read its penultimate layer with
  ``safedl.models.features.extract_features`` (a forward hook: any nn.Module); if it is None and ``train_fn`` is
  given they train one with it.
- ``trusted``: a small clean set (e.g. the validation split); optional for most cleansers, required by RONI,
  provenance's source test and influence.
- ``train_fn(data, **kw) -> model``: trains a fresh model of the right architecture with the baseline recipe (the
  pipeline passes ``ctx.train_like_baseline``). Cross-validated cleansers (data cleaning) use it to train their own
  models, so no sample is scored by a model that saw it; influence functions pass ``on_epoch_end`` to collect
  checkpoints.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from safedl.data.dataset import Dataset
from safedl.errors import ConfigError

TrainFn = Callable[..., nn.Module]


def need_model(name: str, data: Dataset, model: nn.Module | None, train_fn: TrainFn | None) -> nn.Module:
    """The model trained on ``data``: the one given, or one trained with ``train_fn``."""
    if model is not None:
        return model
    if train_fn is None:
        raise ConfigError(f"{name}: needs a model trained on the data (model=...) or a training function (train_fn=...)")
    return train_fn(data)


def gmm_split(values: np.ndarray, *, seed: int) -> dict[str, Any]:
    """Fit a two-component Gaussian mixture (full covariances) to N x k values; posteriors, weights, Ashman's D.

    Ashman's D = sqrt(2) |mu1 - mu2| / sqrt(s1^2 + s2^2), measured along the line joining the two means (s_j^2 is
    component j's variance in that direction); D > 2 is the usual bound for clearly separated modes.
    """
    from sklearn.mixture import GaussianMixture

    v = np.asarray(values, dtype=np.float64)
    v = v.reshape(len(v), -1)
    if len(v) < 4 or float(v.std()) == 0.0:
        return {"post": np.zeros((len(v), 2)), "weights": [1.0, 0.0], "D": 0.0, "model": None}
    gm = GaussianMixture(2, random_state=seed, n_init=3, reg_covar=1e-6 * float(v.var()) + 1e-9).fit(v)
    diff = gm.means_[0] - gm.means_[1]
    u = diff / max(float(np.linalg.norm(diff)), 1e-12)
    var = [float(u @ gm.covariances_[j] @ u) for j in range(2)]
    d = math.sqrt(2.0) * float(np.linalg.norm(diff)) / max(math.sqrt(var[0] + var[1]), 1e-12)
    return {"post": gm.predict_proba(v), "weights": gm.weights_.tolist(), "D": float(d), "model": gm}


def foreign_mode(data_assign: np.ndarray, trusted_assign: np.ndarray | None) -> dict:
    """Decide which of the modes of a class (cluster assignments 0..k-1, k >= 2) is foreign to the trusted samples of that class.

    A legitimate mode (e.g. slanted and upright ones) receives trusted samples in proportion to its share of the
    data; a mode made of poisons receives (almost) none. For each mode the one-sided binomial probability of seeing
    at most the observed trusted count, given its data share, is computed; the mode with the smaller probability is
    the candidate, ``p_value`` is its probability and ``trusted_ratio`` its observed / expected trusted share (train
    and held-out features of a clean class differ a little, so a foreign mode must also get almost none). Without trusted samples the smaller mode is the candidate and
    ``p_value`` is None (the usual assumption that poisons are a minority of their class).
    """
    from scipy.stats import binom

    sizes = np.bincount(data_assign, minlength=2)  # two modes or more (activation_clustering's n_clusters)
    if trusted_assign is None or len(trusted_assign) == 0:
        return {"mode": int(np.argmin(sizes)), "p_value": None, "how": "smaller mode"}
    share = sizes / max(1, sizes.sum())
    t_counts = np.bincount(trusted_assign, minlength=len(sizes))
    p = [float(binom.cdf(t_counts[j], len(trusted_assign), share[j])) for j in range(len(sizes))]
    j = int(np.argmin(p))
    ratio = float(t_counts[j] / len(trusted_assign) / max(share[j], 1e-12))
    return {"mode": j, "p_value": p[j], "trusted_ratio": ratio, "trusted_counts": t_counts.tolist(),
            "how": "mode avoided by trusted samples"}


def class_indices(y: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    return [torch.nonzero(y == c).flatten() for c in range(num_classes)]


ClassJudge = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, dict[str, Any]]]


def judge_per_class(feats: np.ndarray, data: Dataset, judge: ClassJudge, *, min_n: int,
                    skipped: str | None = None) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """(flags, scores, per-class facts) of ``judge(features of one class) -> (flags, scores, facts)`` run on each
    class of ``data`` with at least ``min_n`` samples; a smaller class is left unflagged (and listed with the
    ``skipped`` reason when one is given)."""
    flag, score, per_class = np.zeros(len(data), dtype=bool), np.zeros(len(data)), []
    for c, idx_t in enumerate(class_indices(data.y, data.num_classes)):
        idx = idx_t.numpy()
        if len(idx) < min_n:
            if skipped is not None:
                per_class.append({"class": c, "n": len(idx), "skipped": skipped})
            continue
        f, s, facts = judge(feats[idx])
        flag[idx], score[idx] = f, s
        per_class.append({"class": c, "n": len(idx), "flagged": int(f.sum()), **facts})
    return flag, score, per_class


#: Settings where the feature-space cleansers (spectral signatures, activation clustering) were measured to fail;
#: the report warns when a run is in one of them.
FEATURE_SPACE_KNOWN_WEAK: dict[str, str] = {
    "trusted:none": "without trusted data the smaller mode of a class is taken as the poison; when poisons are about "
                    "half their target class or more it flags the clean mode or nothing (mnist5k all-to-one to class "
                    "3: 10% seed 0, all four triggers, and seed 1 checkerboard: TPR 0.000, n=350; 20% checkerboard: "
                    "0.000, n=700; it held for checkerboard 10% at seed 2 and to class 0: 1.000); at 5% it held "
                    "for the checkerboard and single pixel (TPR 1.000, n=175) but not for blended noise or the "
                    "random patch (0.000, n=175); bench/measure_poison_generalization.py)",
    "trigger:blended": "a full-image blended trigger is found but not all of it, and the rest still implants the "
                       "backdoor: mnist5k blended noise (alpha 0.2) 5% to class 3, seed 0: spectral signatures TPR "
                       "0.949 [0.905, 0.973] (n=175), FPR 0.003, ASR after retraining 0.067 (n=900); at 10%: TPR "
                       "1.000, ASR 0.001 (bench/measure_poison_generalization.py)",
    "trusted:small": "with few trusted images per class the foreign mode cannot be told from a clean one: mnist5k "
                     "with 100 trusted images (about 10 a class), seed 0: checkerboard 1% TPR 0.000 (n=35; 0.971 with "
                     "the 500-image validation split), all-to-all checkerboard 10% TPR 0.000; digits (18 a class): "
                     "no 10% cell met TPR >= 0.9 (bench/measure_poison_generalization.py)",
    "mapping:all_to_all": "all-to-all poison puts a small foreign mode in every class: found on mnist5k with the "
                          "500-image validation split (checkerboard 10%, seed 0: SS TPR 0.997, AC 1.000, n=350) but "
                          "not with 100 trusted images (about 10 per class: TPR 0.000), nor on digits, where the "
                          "backdoor is barely learned (TPR <= 0.22, n=126; bench/measure_poison_generalization.py)",
    "trigger:single_pixel": "a one-pixel trigger moves the features of its poisons little, so they may not form one "
                            "mode: mnist5k single pixel 10% to class 3, seed 2, validation split trusted: activation "
                            "clustering TPR 0.891 [0.854, 0.920], spectral signatures 0.437 (n=350), ASR after "
                            "retraining 0.149 (n=900); seeds 0-1 and 5%: TPR >= 0.99 "
                            "(bench/measure_poison_generalization.py)",
    "trigger:random_position": "a patch at a random position per image is learned weakly and its poisons do not "
                               "form one mode (mnist5k, target 3, seed 0, validation split trusted: 10% spectral "
                               "signatures TPR 0.774 [0.728, 0.815], activation clustering 0.000, n=350; 5%: both "
                               "0.000, n=175, ASR 0.097 left in place; bench/measure_poison_generalization.py)",
}
