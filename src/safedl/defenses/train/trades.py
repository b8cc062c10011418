"""TRADES (Zhang, Yu, Jiao, Xing, El Ghaoui, Jordan, "Theoretically Principled Trade-off between Robustness and
Accuracy", ICML 2019)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from safedl.attacks.base import make_generator
from safedl.attacks.evasion._lp import pgd_steps
from safedl.defenses.train.adversarial_training import EpsSchedule, RobustTrainer, check_epochs
from safedl.registry import register
from safedl.utils.tensors import eval_mode, frozen_params
from safedl.utils.validate import check_choice, check_fraction, check_positive


@register("trainer", "trades")
class TRADES(RobustTrainer):
    """Minimise CE(f(x), y) + beta * KL(f(x) || f(x')), where x' maximises the KL term inside the eps-ball.

    The inner maximisation is PGD on the KL divergence (not on the label loss) from x + 0.001 * N(0, 1), as in
    the paper; defaults follow its MNIST setting (beta 6, 40 steps of 0.01 at eps 0.3 there; fewer steps here
    with the step size scaled to keep 2.5 * eps / steps).
    """

    def __init__(self, *, beta: float = 6.0, eps: float = 0.3, norm: str = "linf", steps: int = 7,
                 alpha: float | None = None, eps_ramp: float = 0.25, epochs: int | None = None):
        self.beta = float(check_positive(self, "beta", beta, allow_zero=True))
        self.eps = float(check_positive(self, "eps", eps))
        self.norm = check_choice(self, "norm", norm, ("linf", "l2"))
        self.steps = check_positive(self, "steps", steps, integer=True)
        self.alpha = None if alpha is None else float(check_positive(self, "alpha", alpha))
        self.eps_ramp = float(check_fraction(self, "eps_ramp", eps_ramp, allow_zero=True))
        self.epochs = check_epochs(self, epochs)

    def _inner_max(self, model: nn.Module, x: torch.Tensor, eps: float, gen) -> torch.Tensor:
        alpha = self.alpha if self.alpha is not None else 2.5 * eps / self.steps
        with eval_mode(model), frozen_params(model), torch.enable_grad():
            p_clean = model(x).softmax(1).detach()
            noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            delta = ((x + 0.001 * noise).clamp(0, 1) - x)
            delta = pgd_steps(x, delta, lambda xa: F.kl_div(model(xa).log_softmax(1), p_clean, reduction="sum"),
                              steps=self.steps, alpha=alpha, norm=self.norm, eps=eps)
        return (x + delta).detach()

    def _loss(self, schedule: EpsSchedule, seed: int):
        def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            eps = schedule.next()
            gen = make_generator(seed + schedule.step, x.device)
            x_adv = self._inner_max(model, x, eps, gen) if eps > 0 else x
            both = model(torch.cat([x, x_adv]))
            n = len(x)
            logits, logits_adv = both[:n], both[n:]
            robust = F.kl_div(logits_adv.log_softmax(1), logits.softmax(1), reduction="batchmean")
            return F.cross_entropy(logits, y) + self.beta * robust

        return loss_fn
