"""Interval bound propagation training (Gowal et al., "On the Effectiveness of Interval Bound Propagation for
Training Verifiably Robust Models", arXiv:1810.12715, 2018, Sec. 3.2): minimise
``kappa * CE(z(x), y) + (1 - kappa) * CE(z_hat(x, eps), y)``, where z_hat is the worst-case logit vector the
interval bounds allow (``z_hat_j = -lower bound of z_y - z_j``), with eps ramped from 0 and kappa from
``kappa_start`` down to ``kappa_end`` over the same ramp."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from safedl.data.dataset import Dataset
from safedl.defenses.certify.interval_bounds import layers, margin_lower_bounds
from safedl.defenses.train.adversarial_training import EpsSchedule, RobustTrainer, check_epochs
from safedl.models.train import TrainRecipe
from safedl.registry import register
from safedl.utils.validate import check_fraction, check_range


def ibp_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, kappa: float) -> torch.Tensor:
    """Gowal et al.'s mixed loss: kappa on the clean CE, 1 - kappa on the CE of the worst-case logits."""
    fit = F.cross_entropy(model(x), y)
    if eps <= 0 or kappa >= 1:
        return fit
    z_hat = -margin_lower_bounds(model, x, y, eps)  # column y is 0
    return kappa * fit + (1 - kappa) * F.cross_entropy(z_hat, y)


@register("trainer", "ibp")
class IBPTraining(RobustTrainer):
    """Verified training by interval bound propagation (Gowal et al. 2018) at L-inf ``eps``.

    ``eps_ramp``: share of the optimizer steps over which eps grows linearly from 0 and kappa from ``kappa_start``
    to ``kappa_end`` (Gowal et al.: kappa 1 -> 0.5); ``epochs`` (None: the baseline recipe's) overrides the number of
    passes only. The model must consist of layers IBP can bound (``certify/interval_bounds.py``).
    """

    def __init__(self, *, eps: float = 0.1, eps_ramp: float = 0.5, kappa_start: float = 1.0, kappa_end: float = 0.5,
                 epochs: int | None = None):
        self.eps = float(check_range(self, "eps", eps, low=0, high=1, low_inclusive=False))
        self.eps_ramp = float(check_fraction(self, "eps_ramp", eps_ramp, allow_zero=True))
        self.kappa_start = float(check_fraction(self, "kappa_start", kappa_start, allow_zero=True))
        self.kappa_end = float(check_fraction(self, "kappa_end", kappa_end, allow_zero=True))
        self.epochs = check_epochs(self, epochs)

    def kappa(self, schedule: EpsSchedule) -> float:
        """kappa at the schedule's current step (linear from kappa_start to kappa_end over the ramp)."""
        t = 1.0 if schedule.ramp_steps <= 0 else min(1.0, schedule.step / schedule.ramp_steps)
        return self.kappa_start + t * (self.kappa_end - self.kappa_start)

    def fit(self, model: nn.Module, data: Dataset, *, recipe: TrainRecipe, seed: int,
            device: torch.device | str = "cpu", val: Dataset | None = None) -> nn.Module:
        layers(model)  # refuse an unsupported layer before any training
        return super().fit(model, data, recipe=recipe, seed=seed, device=device, val=val)

    def _loss(self, schedule: EpsSchedule, seed: int):
        def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            eps = schedule.next()
            return ibp_loss(model, x, y, eps=eps, kappa=self.kappa(schedule))

        return loss_fn
