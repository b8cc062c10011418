"""Auto-PGD core (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020): momentum 0.75, step size 2*eps halved at checkpoints when progress stalls."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from safedl.attacks.base import EvasionAttack, input_grad, make_generator
from safedl.attacks.evasion._losses import is_success
from safedl.attacks.evasion._lp import project, random_start, steepest_step
from safedl.utils.validate import check_fraction, check_positive

# loss(logits, y, target) -> per-sample loss to maximise
LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def checkpoints(steps: int) -> list[int]:
    """Iterations w_j = ceil(p_j * steps) with p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(round(q * steps, 9)) for q in p if 0 < q <= 1})  # round: 0.57 is 0.5700000001


class APGDBase(EvasionAttack):
    """Shared Auto-PGD loop; subclasses choose the loss."""

    momentum: float = 0.75

    def __init__(self, *, eps: float = 0.3, norm: str = "linf", steps: int = 100, restarts: int = 1, rho: float = 0.75,
                 random_start: bool = True, seed: int | None = 0):
        self._init_norm_eps(norm, eps)
        self.steps = check_positive(self, "steps", steps, integer=True)
        self.restarts = check_positive(self, "restarts", restarts, integer=True)
        self.rho = float(check_fraction(self, "rho", rho))
        self.random_start = bool(random_start)
        self.seed = seed

    def _loss(self, z: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        gen = make_generator(self.seed, x.device)
        return self._restarts(model, x, y, target, gen)

    def _restarts(self, model, x, y, target, gen) -> torch.Tensor:
        """Run ``restarts`` APGD runs, each only on the samples no earlier run has broken."""
        out = x.clone()
        todo = torch.arange(len(x), device=x.device)
        for r in range(self.restarts):
            t = None if target is None else target[todo]
            x_adv, ok = self.run(model, x[todo], y[todo], t, gen, start=self.random_start or r > 0)
            out[todo] = x_adv
            todo = todo[~ok]
            if len(todo) == 0:
                break
        return out

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
            gen: torch.Generator | None, *, start: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """One APGD run: returns (x_adv, success). ``steps`` gradient evaluations and steps + 1 forward passes.

        x_adv is the first successful iterate of a sample, else its highest-loss iterate.
        """
        n, view = len(x), (-1,) + (1,) * (x.ndim - 1)
        ckpts = set(checkpoints(self.steps))
        x_adv = x + random_start(x, self.norm, self.eps, gen) if start else x.clone()

        def evaluate(xa: torch.Tensor, with_grad: bool):
            if not with_grad:
                with torch.no_grad():
                    z = model(xa)
                    return self._loss(z, y, target), z, None
            xa = xa.clone().requires_grad_(True)
            z = model(xa)
            loss = self._loss(z, y, target)
            return loss.detach(), z.detach(), input_grad(loss.sum(), xa)

        loss, z, g = evaluate(x_adv, True)
        found = is_success(z, y, target)
        x_out = x_adv.clone()
        x_best, loss_best, g_best = x_adv.clone(), loss.clone(), g.clone()
        eta = torch.full((n,), 2 * self.eps, device=x.device, dtype=x.dtype)
        x_prev = x_adv.clone()
        loss_prev = loss.clone()
        increases = torch.zeros(n, device=x.device)
        last_ckpt, loss_best_at_ckpt = 0, loss_best.clone()
        reduced_at_ckpt = torch.zeros(n, dtype=torch.bool, device=x.device)
        for k in range(self.steps):
            a = 1.0 if k == 0 else self.momentum
            z_step = self._proj(x, x_adv + eta.view(view) * steepest_step(g, self.norm))
            x_new = self._proj(x, x_adv + a * (z_step - x_adv) + (1 - a) * (x_adv - x_prev))
            x_prev, x_adv = x_adv, x_new
            loss, z, g = evaluate(x_adv, k < self.steps - 1)
            newly = is_success(z, y, target) & ~found
            x_out[newly] = x_adv[newly]
            found |= newly
            increases += (loss > loss_prev).float()
            loss_prev = loss
            better = loss > loss_best
            x_best[better], loss_best[better] = x_adv[better], loss[better]
            if g is not None:
                g_best[better] = g[better]
            if k + 1 in ckpts and k < self.steps - 1:
                # halve the step where too few steps increased the loss, or where neither the step size nor the
                # best loss changed since the last checkpoint; restart those samples from their best point
                cond1 = increases < self.rho * (k + 1 - last_ckpt)
                cond2 = ~reduced_at_ckpt & (loss_best <= loss_best_at_ckpt)
                reduce = cond1 | cond2
                eta[reduce] /= 2
                x_adv[reduce], g[reduce] = x_best[reduce], g_best[reduce]
                reduced_at_ckpt, loss_best_at_ckpt = reduce, loss_best.clone()
                increases.zero_()
                last_ckpt = k + 1
        x_out[~found] = x_best[~found]
        return x_out, found

    def _proj(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        return (x + project(x_adv - x, self.norm, self.eps)).clamp(0, 1)
