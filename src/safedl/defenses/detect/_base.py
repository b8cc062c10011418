"""Shared base of adversarial-input detectors: clean-data threshold calibration for a target false-positive rate,
and the supervised detectors' machinery (Ma et al. 2018; Lee et al. 2018): per-layer activations, adversarial
examples made at fit time by a configurable attack, and a logistic regression on per-layer characteristics."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from safedl import registry
from safedl.errors import ConfigError
from safedl.models.normalize import Normalize
from safedl.utils.tensors import eval_mode, frozen_params, model_device
from safedl.utils.validate import check_fraction, check_is_fitted, check_positive

log = logging.getLogger(__name__)


_SKIP = (Normalize, nn.Flatten, nn.Dropout, nn.Identity, nn.Sequential, nn.ModuleList)


def layer_outputs(model: nn.Module, x: torch.Tensor, *, pool: bool, layers: str = "relu") -> list[torch.Tensor]:
    """Per-layer outputs in forward order, then the logits, each N x D (hooks keep them in the autograd graph).

    ``layers="relu"``: every ReLU module; ``"all"``: every leaf module except normalization, flatten, dropout and
    identity (convolutions, activations, pooling, linear layers; Ma et al. use every layer). ``pool``: 4-d outputs
    are averaged over their spatial dimensions (one value per channel, as Lee et al. do), else flattened.
    """
    acts: list[torch.Tensor] = []

    def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
        acts.append(out.mean((2, 3)) if pool and out.ndim == 4 else out.flatten(1))

    if layers == "relu":
        chosen = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    else:
        chosen = [m for m in model.modules() if not list(m.children()) and not isinstance(m, _SKIP)]
    hooks = [m.register_forward_hook(hook) for m in chosen]
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    if layers == "all" and acts and acts[-1].shape == logits.flatten(1).shape and torch.equal(acts[-1], logits.flatten(1)):
        acts.pop()  # the last leaf is the classifier itself
    return acts + [logits.flatten(1)]


class Detector:
    """``fit(x_clean, *, model) -> self``, ``score(x)`` (higher = more adversarial), ``predict(x)`` (True = flagged).

    ``fit`` holds out ``calibration_fraction`` of the clean images; the threshold is the (1 - ``fpr``) quantile of
    their scores, so the clean false-positive rate is ``fpr`` up to sampling error. Subclasses implement
    ``_fit(x, model)`` and a differentiable ``score_torch(x)`` (adaptive attacks descend it).
    ``sees_raw_input``: the deployed pipeline scores the raw input, not the preprocessors' output (MagNet's detector
    next to its reformer); False for every detector unless it says otherwise.
    """

    sees_raw_input: bool = False

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
        """Scores (N), batched, without gradients, on x's device; NotFittedError before ``fit``."""
        check_is_fitted(self, "model_", verb="fit(x_clean, model=...)")
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


class SupervisedDetector(Detector):
    """A detector whose score is a logistic regression on per-layer characteristics (``_characteristics(x)``, N x L,
    differentiable), trained on clean images and clean images with uniform L-inf noise of size ``eps`` (negatives)
    against adversarial examples that ``attack`` (registry name, with ``attack_params``, at budget ``eps``) makes on
    the fitted model (positives), as Ma et al. (2018) and Lee et al. (2018) do.

    The papers fit and test on examples of the same attack; the detector then knows the attack it is tested on. A
    test on a different attack (e.g. fit on FGSM, test on PGD) measures how far the detector generalises.
    """

    def _init_attack(self, attack: str, eps: float, attack_params: dict | None, max_fit: int) -> None:
        registry.get("evasion", attack)  # an unknown name lists the valid ones
        accepted = {p.name for p in registry.params("evasion", attack)}
        params = dict(self._default_attack_params(attack) if attack_params is None else attack_params)
        unknown = sorted(set(params) - accepted)
        if unknown or "eps" in params:
            raise ConfigError(f"{self.registry_name}: attack_params {sorted(params)} for {attack!r} are not allowed; "
                              f"use eps={eps!r} for the budget and choose from: {', '.join(sorted(accepted - {'eps'}))}")
        self.attack = attack
        self.eps = float(check_positive(self, "eps", eps))
        self.attack_params = attack_params
        self.max_fit = check_positive(self, "max_fit", max_fit, integer=True)

    @staticmethod
    def _default_attack_params(attack: str) -> dict:
        """An iterative attack gets 20 steps by default (the papers' BIM/PGD budgets)."""
        return {"steps": 20} if "steps" in {p.name for p in registry.params("evasion", attack)} else {}

    def _characteristics(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _batched_characteristics(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._characteristics(x[i : i + self.batch_size]).detach()
                          for i in range(0, len(x), self.batch_size)])

    def fit_examples(self, x: torch.Tensor, y: torch.Tensor, model: nn.Module, seed: int) -> torch.Tensor:
        """The fit-time adversarial examples: ``attack`` at ``eps`` (with ``attack_params``) on ``model``."""
        params = dict(self._default_attack_params(self.attack) if self.attack_params is None else self.attack_params)
        if "seed" in {p.name for p in registry.params("evasion", self.attack)}:
            params.setdefault("seed", seed)
        attack = registry.create("evasion", self.attack, eps=self.eps, **params)
        if hasattr(attack, "fit"):
            raise ConfigError(f"{self.registry_name}: attack {self.attack!r} needs its own fit; choose a white-box "
                              "or query attack")
        return torch.cat([attack(model, x[i : i + self.batch_size], y[i : i + self.batch_size])
                          for i in range(0, len(x), self.batch_size)])

    def _fit_regression(self, x: torch.Tensor, y: torch.Tensor, model: nn.Module, seed: int) -> None:
        """Make the fit-time adversarial and noisy examples from ``x`` and fit the standardised logistic regression."""
        from sklearn.linear_model import LogisticRegression

        g = torch.Generator().manual_seed(int(seed) + 1)
        x_adv = self.fit_examples(x, y, model, seed)
        noise = (torch.rand(x.shape, generator=g) * 2 - 1).to(x.device) * self.eps
        x_noisy = (x + noise).clamp(0, 1)
        with eval_mode(model), frozen_params(model):
            feats = [self._batched_characteristics(v) for v in (x, x_noisy, x_adv)]
        f = torch.cat(feats).cpu().double()
        target = np.r_[np.zeros(2 * len(x)), np.ones(len(x))]
        self.feat_mean_ = f.mean(0).float()
        self.feat_std_ = f.std(0).clamp_min(1e-8).float()
        z = ((f.float() - self.feat_mean_) / self.feat_std_).numpy()
        lr = LogisticRegression(max_iter=2000, class_weight="balanced").fit(z, target)
        self.coef_ = torch.tensor(lr.coef_[0], dtype=torch.float32)
        self.intercept_ = float(lr.intercept_[0])
        self.fit_accuracy_ = float(lr.score(z, target))
        log.info("%s: logistic regression on %d characteristics, fit accuracy %.3f (%d clean, %d noisy, %d %s)",
                 self.registry_name, z.shape[1], self.fit_accuracy_, len(x), len(x), len(x), self.attack)

    def score_torch(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device
        z = (self._characteristics(x) - self.feat_mean_.to(dev)) / self.feat_std_.to(dev)
        return z @ self.coef_.to(dev) + self.intercept_
