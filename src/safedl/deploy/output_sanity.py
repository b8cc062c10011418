"""Output sanity check of a deployed system: a confident answer on an input far from the training data is refused.

A classifier is often most confident exactly where it has seen nothing (Nguyen et al. 2015, "Deep neural networks
are easily fooled"; Hein et al. 2019, "Why ReLU networks yield high-confidence predictions far away from the
training data"). This check pairs the answer with how far the input lies from the training data: it rejects an
image (reason ``sanity:overconfident_far``) when its distance exceeds the ``quantile`` of the distances of held-out
clean images **and** its top probability exceeds ``max_confidence``.

The distance is our own simple variant of a Mahalanobis distance (Lee et al. 2018 use class-conditional Gaussians
of features; we use one diagonal Gaussian of the raw pixels, which needs no model internals): the root mean square
of the per-pixel z-scores, ``sqrt(mean(((x - mean_) / std_) ** 2))``, with ``mean_`` and ``std_`` fitted on the
training images. Learned state ends in ``_``.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from safedl.errors import BundleError, UserError

REASON = "sanity:overconfident_far"
STD_FLOOR = 1e-3  # pixels constant in the training data (MNIST's borders) would otherwise give infinite z-scores


class OutputSanity:
    """``fit(x_train, x_calibration) -> self``; ``check(x, probs) -> BoolTensor[N]`` (True: refuse the answer)."""

    def __init__(self, *, max_confidence: float = 0.99, quantile: float = 0.999):
        for name, v in (("max_confidence", max_confidence), ("quantile", quantile)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) < 1.0:
                raise UserError(f"--sanity-{name.replace('_', '-')} {v!r}: must be a number in (0, 1)")
        self.max_confidence, self.quantile = float(max_confidence), float(quantile)

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        """Per image: RMS z-score of its pixels under the training data's per-pixel mean and std."""
        z = (x.flatten(1).float() - self.mean_.to(x.device)) / self.std_.to(x.device)
        return z.pow(2).mean(1).sqrt()

    def fit(self, x_train: torch.Tensor, x_calibration: torch.Tensor) -> "OutputSanity":
        """Per-pixel statistics of ``x_train``; the distance threshold is ``quantile`` of ``x_calibration``'s."""
        if len(x_train) < 2 or len(x_calibration) < 1:
            raise UserError("output sanity: needs at least 2 training and 1 calibration image")
        flat = x_train.flatten(1).float()
        self.mean_ = flat.mean(0)
        self.std_ = flat.std(0).clamp_min(STD_FLOOR)
        self.distance_threshold_ = float(torch.quantile(self.distance(x_calibration), self.quantile))
        self.n_calibration_ = int(len(x_calibration))
        return self

    def check(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """True where the top probability is over ``max_confidence`` on an input beyond the distance threshold."""
        return (probs.max(1).values > self.max_confidence) & (self.distance(x) > self.distance_threshold_)

    # -- bundle record ---------------------------------------------------------------------------------------
    def to_record(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(manifest entry, tensors for its state file)."""
        meta = {"max_confidence": self.max_confidence, "quantile": self.quantile,
                "distance_threshold": self.distance_threshold_, "n_calibration": self.n_calibration_}
        return meta, {"mean": self.mean_, "std": self.std_}

    @classmethod
    def from_record(cls, meta: Any, tensors: dict[str, torch.Tensor], *, where: str) -> "OutputSanity":
        try:
            check = cls(max_confidence=meta["max_confidence"], quantile=meta["quantile"])
            check.distance_threshold_ = float(meta["distance_threshold"])
            check.n_calibration_ = int(meta["n_calibration"])
            check.mean_, check.std_ = tensors["mean"].float(), tensors["std"].float()
        except (KeyError, TypeError, ValueError, UserError) as exc:
            raise BundleError(f"{where}: output_sanity cannot be rebuilt ({type(exc).__name__}: {exc})") from None
        if check.mean_.shape != check.std_.shape or not math.isfinite(check.distance_threshold_):
            raise BundleError(f"{where}: output_sanity state is inconsistent")
        return check
