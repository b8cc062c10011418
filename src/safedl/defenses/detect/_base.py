"""Shared base of adversarial-input detectors: clean-data threshold calibration for a target false-positive rate."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from safedl.models.normalize import Normalize
from safedl.utils.tensors import eval_mode, frozen_params, model_device
from safedl.utils.validate import check_fraction, check_positive


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Penultimate features of a zoo model, through its Normalize wrapper when present."""
    if isinstance(model, nn.Sequential) and len(model) == 2 and isinstance(model[0], Normalize):
        return model[1].features(model[0](x))
    if hasattr(model, "features"):
        return model.features(x)
    raise ValueError("this detector needs a model with a features(x) method (every zoo model has one)")


def auroc(neg: torch.Tensor, pos: torch.Tensor) -> float:
    """Area under the ROC curve of scores (higher = positive), ties counted half (Mann-Whitney U)."""
    if len(neg) == 0 or len(pos) == 0:
        return float("nan")
    allv = torch.cat([neg, pos]).double()
    ranks = torch.empty_like(allv)
    order = allv.argsort()
    ranks[order] = torch.arange(1, len(allv) + 1, dtype=torch.double)
    # average ranks of ties
    uniq, inv = torch.unique(allv, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.double).index_add_(0, inv, ranks)
    cnts = torch.zeros(len(uniq), dtype=torch.double).index_add_(0, inv, torch.ones_like(ranks))
    ranks = (sums / cnts)[inv]
    r_pos = ranks[len(neg):].sum()
    u = r_pos - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


class Detector:
    """``fit(x_clean, *, model) -> self``, ``score(x)`` (higher = more adversarial), ``predict(x)`` (True = flagged).

    ``fit`` holds out ``calibration_fraction`` of the clean images; the threshold is the (1 - ``fpr``) quantile of
    their scores, so the clean false-positive rate is ``fpr`` up to sampling error. Subclasses implement
    ``_fit(x, model)`` and a differentiable ``score_torch(x)`` (adaptive attacks descend it).
    """

    def _init_common(self, fpr: float, calibration_fraction: float, batch_size: int) -> None:
        self.fpr = float(check_fraction(self, "fpr", fpr, allow_zero=False, allow_one=False))
        self.calibration_fraction = float(check_fraction(self, "calibration_fraction", calibration_fraction,
                                                         allow_zero=False, allow_one=False))
        self.batch_size = check_positive(self, "batch_size", batch_size, integer=True)

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and not k.endswith("_")}

    def fit(self, x_clean: torch.Tensor, *, model: nn.Module, y: torch.Tensor | None = None,
            x_calibration: torch.Tensor | None = None, seed: int = 0, **kwargs: Any) -> "Detector":
        """Fit on clean images; calibrate the threshold on ``x_calibration`` (clean images the model was not trained
        on, e.g. the validation split: scores of training images are optimistic) or, without it, on a held-out
        ``calibration_fraction`` of ``x_clean``."""
        g = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(len(x_clean), generator=g)
        n_cal = 0 if x_calibration is not None else max(1, int(round(self.calibration_fraction * len(x_clean))))
        cal, fit_idx = perm[:n_cal], perm[n_cal:]
        self.model_ = model
        self._fit(x_clean[fit_idx], model, y=None if y is None else y[fit_idx], seed=seed, **kwargs)
        self.calibration_scores_ = self.score(x_clean[cal] if x_calibration is None else x_calibration).cpu()
        self.threshold_ = self.threshold_at(self.fpr)
        spread = float(self.calibration_scores_.std()) if len(self.calibration_scores_) > 1 else 1.0
        self.score_scale_ = spread if spread > 0 else 1.0
        return self

    def _fit(self, x: torch.Tensor, model: nn.Module, *, y: torch.Tensor | None, seed: int, **kwargs: Any) -> None:
        raise NotImplementedError

    def threshold_at(self, fpr: float) -> float:
        """The score threshold whose clean false-positive rate on the calibration images is at most ``fpr``."""
        s = self.calibration_scores_.double()
        return float(torch.quantile(s, 1 - fpr, interpolation="higher"))

    def score_torch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Scores (N), batched, without gradients, on x's device."""
        dev = model_device(self.model_)
        outs = []
        with eval_mode(self.model_), frozen_params(self.model_):
            for i in range(0, len(x), self.batch_size):
                outs.append(self._score_nograd(x[i : i + self.batch_size].to(dev)).detach().to(x.device))
        return torch.cat(outs) if outs else torch.empty(0)

    def _score_nograd(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.score_torch(x)

    def predict(self, x: torch.Tensor, *, threshold: float | None = None) -> torch.Tensor:
        """True where the score exceeds the calibrated threshold (or ``threshold``)."""
        return self.score(x) > (self.threshold_ if threshold is None else threshold)
