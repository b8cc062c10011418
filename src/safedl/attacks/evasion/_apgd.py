"""Auto-PGD core (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020): momentum 0.75, step size 2*eps halved at checkpoints when progress stalls."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
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
                 random_start: bool = True, early_stop: bool = True, seed: int | None = 0):
        self._init_norm_eps(norm, eps)
        self.steps = check_positive(self, "steps", steps, integer=True)
        self.restarts = check_positive(self, "restarts", restarts, integer=True)
        self.rho = float(check_fraction(self, "rho", rho))
        self.random_start = bool(random_start)
        self.early_stop = bool(early_stop)
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
        """One APGD run: returns (x_adv, success). At most ``steps`` gradient evaluations and steps + 1 forward passes
        per sample.

        x_adv is the first successful iterate of a sample, else its highest-loss iterate. With ``early_stop`` a
        sample leaves the batch at its first success: every update is per sample, so the others follow the same
        trajectory and the success set and examples are those of the full loop (up to float rounding of batch size).
        """
        ckpts = set(checkpoints(self.steps))
        x_adv = x + random_start(x, self.norm, self.eps, gen) if start else x.clone()
        loss, z, g = self._evaluate(model, x_adv, y, target, True)
        found = is_success(z, y, target)
        x_out = x_adv.clone()
        st = _State(idx=torch.arange(len(x), device=x.device), x=x, y=y, target=target, x_adv=x_adv,
                    x_prev=x_adv.clone(), g=g, loss_prev=loss.clone(), x_best=x_adv.clone(), loss_best=loss.clone(),
                    g_best=g.clone(), eta=torch.full((len(x),), 2 * self.eps, device=x.device, dtype=x.dtype),
                    increases=torch.zeros(len(x), device=x.device), loss_best_at_ckpt=loss.clone(),
                    reduced_at_ckpt=torch.zeros(len(x), dtype=torch.bool, device=x.device))
        if self.early_stop:
            st = st.keep(~found)
        last_ckpt = 0
        for k in range(self.steps):
            if len(st.idx) == 0:
                break
            self._step(st, k)
            loss, z, st.g = self._evaluate(model, st.x_adv, st.y, st.target, k < self.steps - 1)
            hit = is_success(z, st.y, st.target)
            newly = hit & ~found[st.idx]
            x_out[st.idx[newly]] = st.x_adv[newly]
            found[st.idx[newly]] = True
            st.increases += (loss > st.loss_prev).float()
            st.loss_prev = loss
            better = loss > st.loss_best
            st.x_best[better], st.loss_best[better] = st.x_adv[better], loss[better]
            if st.g is not None:
                st.g_best[better] = st.g[better]
            if k + 1 in ckpts and k < self.steps - 1:
                self._checkpoint(st, k + 1 - last_ckpt)
                last_ckpt = k + 1
            if self.early_stop:
                st = st.keep(~hit)
        rest = ~found[st.idx]
        x_out[st.idx[rest]] = st.x_best[rest]
        return x_out, found

    def _evaluate(self, model: nn.Module, xa: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                  with_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(per-sample loss, logits, input gradient of the loss or None)."""
        if not with_grad:
            with torch.no_grad():
                z = model(xa)
                return self._loss(z, y, target), z, None
        xa = xa.clone().requires_grad_(True)
        z = model(xa)
        loss = self._loss(z, y, target)
        return loss.detach(), z.detach(), input_grad(loss.sum(), xa)

    def _step(self, st: "_State", k: int) -> None:
        """The momentum step from ``st.x_adv`` (Croce & Hein 2020, eq. 2), in place."""
        view = (-1,) + (1,) * (st.x.ndim - 1)
        a = 1.0 if k == 0 else self.momentum
        z_step = self._proj(st.x, st.x_adv + st.eta.view(view) * steepest_step(st.g, self.norm))
        x_new = self._proj(st.x, st.x_adv + a * (z_step - st.x_adv) + (1 - a) * (st.x_adv - st.x_prev))
        st.x_prev, st.x_adv = st.x_adv, x_new

    def _checkpoint(self, st: "_State", since: int) -> None:
        """Halve the step where too few steps increased the loss, or where neither the step size nor the best loss
        changed since the last checkpoint; restart those samples from their best point (in place)."""
        cond1 = st.increases < self.rho * since
        cond2 = ~st.reduced_at_ckpt & (st.loss_best <= st.loss_best_at_ckpt)
        reduce = cond1 | cond2
        st.eta[reduce] /= 2
        st.x_adv[reduce], st.g[reduce] = st.x_best[reduce], st.g_best[reduce]
        st.reduced_at_ckpt, st.loss_best_at_ckpt = reduce, st.loss_best.clone()
        st.increases.zero_()

    def _proj(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        return (x + project(x_adv - x, self.norm, self.eps)).clamp(0, 1)


@dataclass
class _State:
    """The per-sample state of one APGD run, for the samples still attacked (``idx`` into the batch)."""

    idx: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    target: torch.Tensor | None
    x_adv: torch.Tensor
    x_prev: torch.Tensor
    g: torch.Tensor | None
    loss_prev: torch.Tensor
    x_best: torch.Tensor
    loss_best: torch.Tensor
    g_best: torch.Tensor
    eta: torch.Tensor
    increases: torch.Tensor
    loss_best_at_ckpt: torch.Tensor
    reduced_at_ckpt: torch.Tensor

    def keep(self, mask: torch.Tensor) -> "_State":
        """The state of the samples where ``mask`` is True."""
        if bool(mask.all()):
            return self
        return _State(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[mask]
                         for f in fields(self)})
