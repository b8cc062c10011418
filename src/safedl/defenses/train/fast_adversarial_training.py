"""Fast adversarial training (Wong, Rice, Kolter, "Fast is better than free: Revisiting adversarial training",
ICLR 2020): FGSM from a uniform random start with step 1.25 * eps."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from safedl import registry
from safedl.defenses.train.adversarial_training import EpsSchedule, RobustTrainer, check_epochs
from safedl.registry import register
from safedl.utils.validate import check_choice, check_fraction, check_positive


@register("trainer", "fast_adversarial_training")
class FastAdversarialTraining(RobustTrainer):
    """One signed-gradient step of size ``alpha`` (default 1.25 * eps) from a random point in the eps-ball,
    projected back: the registry's ``pgd`` with ``steps=1`` and a random start, a fresh start per batch."""

    def __init__(self, *, eps: float = 0.3, norm: str = "linf", alpha: float | None = None, eps_ramp: float = 0.25,
                 epochs: int | None = None):
        self.norm = check_choice(self, "norm", norm, ("linf", "l2"))
        self.eps = float(check_positive(self, "eps", eps))
        self.alpha = None if alpha is None else float(check_positive(self, "alpha", alpha))
        self.eps_ramp = float(check_fraction(self, "eps_ramp", eps_ramp, allow_zero=True))
        self.epochs = check_epochs(self, epochs)

    def _loss(self, schedule: EpsSchedule, seed: int):
        def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            eps = schedule.next()
            if eps > 0:
                alpha = self.alpha if self.alpha is not None else 1.25 * eps
                attack = registry.create("evasion", "pgd", eps=eps, norm=self.norm, steps=1, alpha=alpha,
                                         random_start=True, seed=seed + schedule.step)
                x = attack(model, x, y)
            return F.cross_entropy(model(x), y)

        return loss_fn
