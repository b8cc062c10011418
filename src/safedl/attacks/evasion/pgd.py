"""PGD: projected gradient descent with random start and restarts (Madry et al., "Towards Deep Learning Models
Resistant to Adversarial Attacks", ICLR 2018)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from safedl.attacks.base import EvasionAttack, make_generator
from safedl.attacks.evasion._lp import pgd_steps, random_start
from safedl.registry import register
from safedl.utils.validate import check_positive


@register("evasion", "pgd")
class PGD(EvasionAttack):
    """Projected Gradient Descent, L-inf or L2, untargeted or targeted.

    ``alpha`` defaults to 2.5 * eps / steps (Madry et al.). With ``restarts`` > 1 each sample keeps the first
    restart that fools the model (else the last one).
    """

    def __init__(self, *, eps: float = 0.3, norm: str = "linf", steps: int = 10, alpha: float | None = None,
                 random_start: bool = True, restarts: int = 1, seed: int | None = 0):
        self._init_norm_eps(norm, eps)
        self.steps = check_positive(self, "steps", steps, integer=True)
        self.alpha = None if alpha is None else float(check_positive(self, "alpha", alpha))
        self.random_start = bool(random_start)
        self.restarts = check_positive(self, "restarts", restarts, integer=True)
        self.seed = seed

    @property
    def step_size(self) -> float:
        """``alpha``, or Madry et al.'s 2.5 * eps / steps when it is None."""
        return 2.5 * self.eps / self.steps if self.alpha is None else self.alpha

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        gen = make_generator(self.seed, x.device)
        best = None
        for _ in range(self.restarts):
            x_adv = self._one_run(model, x, y, target, gen)
            if self.restarts == 1:
                return x_adv
            with torch.no_grad():
                pred = model(x_adv).argmax(1)
                success = (pred != y) if target is None else (pred == target)
            if best is None:
                best, done = x_adv, success
            else:
                take = success & ~done
                best = torch.where(take.view(-1, 1, 1, 1), x_adv, best)
                done = done | success
                keep_last = ~done  # unbroken samples take the latest restart
                best = torch.where(keep_last.view(-1, 1, 1, 1), x_adv, best)
            if bool(done.all()):
                break
        return best

    def _one_run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                 gen: torch.Generator | None) -> torch.Tensor:
        delta = random_start(x, self.norm, self.eps, gen) if self.random_start else torch.zeros_like(x)
        labels = y if target is None else target
        # untargeted: ascend the loss of the true label; targeted: descend the loss of the target
        delta = pgd_steps(x, delta, lambda xa: F.cross_entropy(model(xa), labels, reduction="sum"),
                          steps=self.steps, alpha=self.step_size, norm=self.norm, eps=self.eps, ascend=target is None)
        return x + delta
