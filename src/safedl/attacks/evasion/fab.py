"""FAB-T: the targeted Fast Adaptive Boundary attack (Croce & Hein, "Minimally distorted Adversarial Examples with a
Fast Adaptive Boundary Attack", ICML 2020), as AutoAttack's standard suite runs it, within an eps budget.

FAB looks for the smallest perturbation that reaches the decision boundary between the true class y and a target
class t. At each step the boundary ``f = z_t - z_y = 0`` (with a given target: ``z_t - max_{j != t} z_j``, so
that success means predicted as t) is linearised at the current point; the current point and
the original input are both projected onto that hyperplane (minimal L-inf / L2 step), and the next point is the
convex combination ``(1 - a)(x_k + eta d_k) + a (x + eta d_0)`` with ``a = min(|d_k| / (|d_k| + |d_0|), alpha_max)``
(the bias towards the original input keeps the perturbation small), clipped to [0, 1]. Whenever a point is
adversarial it becomes the best if it is closer to x, and the iterate steps back towards x (``beta``).

FAB-T (AutoAttack): with no ``target``, the runs aim at each of the ``n_target_classes`` highest-scoring wrong classes
of the clean input in turn, each on the samples not yet broken; success is any wrong label. Within the budget:
a sample's result is its smallest adversarial point found if that lies within ``eps``, else the input unchanged.

Our variant: the paper projects onto the intersection of the hyperplane and the [0, 1] box exactly; this
implementation projects onto the hyperplane in the chosen norm and clips to the box afterwards (the clipped point is
checked, so every returned example is valid; the steps are only less exact near the box's faces).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from safedl.attacks.base import EvasionAttack, make_generator
from safedl.attacks.evasion._losses import other_max
from safedl.registry import register
from safedl.utils.tensors import predict_logits
from safedl.utils.validate import check_positive, check_range


def _norm(d: torch.Tensor, norm: str) -> torch.Tensor:
    flat = d.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def hyperplane_step(w: torch.Tensor, c: torch.Tensor, norm: str) -> torch.Tensor:
    """The minimal-norm d with <w, d> = c per sample (L-inf: c sign(w) / |w|_1; L2: c w / |w|_2^2)."""
    flat = w.flatten(1)
    if norm == "linf":
        d = (c / flat.abs().sum(1).clamp_min(1e-12)).view(-1, 1) * flat.sign()
    else:
        d = (c / flat.pow(2).sum(1).clamp_min(1e-12)).view(-1, 1) * flat
    return d.view_as(w)


@register("evasion", "fab")
class FAB(EvasionAttack):
    """FAB-T (targeted Fast Adaptive Boundary, Croce & Hein 2020), L-inf or L2, returning examples within ``eps``."""

    conformance_params: ClassVar[dict] = {"eps": 0.3, "steps": 10, "n_target_classes": 2}

    def __init__(self, *, eps: float = 0.3, norm: str = "linf", steps: int = 100, restarts: int = 1,
                 n_target_classes: int = 9, eta: float = 1.05, beta: float = 0.9, alpha_max: float = 0.1,
                 seed: int | None = 0):
        self._init_norm_eps(norm, eps)
        self.steps = check_positive(self, "steps", steps, integer=True)
        self.restarts = check_positive(self, "restarts", restarts, integer=True)
        self.n_target_classes = check_positive(self, "n_target_classes", n_target_classes, integer=True)
        self.eta = check_range(self, "eta", eta, low=1.0, high=2.0)
        self.beta = check_range(self, "beta", beta, low=0.0, high=1.0, low_inclusive=False)
        self.alpha_max = check_range(self, "alpha_max", alpha_max, low=0.0, high=1.0)
        self.seed = seed

    def _boundary(self, model: nn.Module, xk: torch.Tensor, y: torch.Tensor, t: torch.Tensor, targeted: bool):
        """The boundary function at xk, its input gradient, and whether xk succeeds. FAB-T (success: any label but
        y): f = z_t - z_y. A given target (success: predicted as t): f = z_t - max_{j != t} z_j."""
        xk = xk.detach().requires_grad_(True)
        with torch.enable_grad():
            z = model(xk)
            zt = z.gather(1, t.view(-1, 1)).squeeze(1)
            f = zt - other_max(z, t) if targeted else zt - z.gather(1, y.view(-1, 1)).squeeze(1)
            (w,) = torch.autograd.grad(f.sum(), xk)
        pred = z.detach().argmax(1)
        return f.detach(), w, (pred == t) if targeted else (pred != y)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
            gen: torch.Generator | None, *, start: bool, targeted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One FAB run towards ``t``: the smallest adversarial point found per sample and its norm (inf: none)."""
        n = len(x)
        best = x.clone()
        best_norm = torch.full((n,), float("inf"), device=x.device)
        xk = x.clone()
        if start:  # a random start inside the budget (the paper's restarts)
            u = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1
            if self.norm == "l2":
                u = u / _norm(u, "l2").clamp_min(1e-12).view(-1, 1, 1, 1)
            xk = (x + 0.5 * self.eps * u).clamp(0, 1)
        for _ in range(self.steps):
            f, w, adv = self._boundary(model, xk, y, t, targeted)
            dist = _norm(xk - x, self.norm)
            better = adv & (dist < best_norm)
            best[better], best_norm[better] = xk[better], dist[better]
            # back towards x after a success (adversarial iterates), as in Alg. 1
            base = torch.where(adv.view(-1, 1, 1, 1), (1 - self.beta) * x + self.beta * xk, xk)
            c_k = -(f + (w * (base - xk)).flatten(1).sum(1))
            c_0 = -(f + (w * (x - xk)).flatten(1).sum(1))
            d_k, d_0 = hyperplane_step(w, c_k, self.norm), hyperplane_step(w, c_0, self.norm)
            nk, n0 = _norm(d_k, self.norm), _norm(d_0, self.norm)
            a = (nk / (nk + n0).clamp_min(1e-12)).clamp(max=self.alpha_max).view(-1, 1, 1, 1)
            xk = ((1 - a) * (base + self.eta * d_k) + a * (x + self.eta * d_0)).clamp(0, 1).detach()
        f, _, adv = self._boundary(model, xk, y, t, targeted)
        dist = _norm(xk - x, self.norm)
        better = adv & (dist < best_norm)
        best[better], best_norm[better] = xk[better], dist[better]
        return best, best_norm

    def _within_budget(self, x: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """Remove float overshoot past eps (at most a relative 1e-6)."""
        d = cand - x
        if self.norm == "linf":
            d = d.clamp(-self.eps, self.eps)
        else:
            d = d * (self.eps / _norm(d, "l2").clamp_min(self.eps)).view(-1, 1, 1, 1)
        return (x + d).clamp(0, 1)

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        gen = make_generator(self.seed, x.device)
        z = predict_logits(model, x)
        k = 1 if target is not None else min(self.n_target_classes, z.shape[1] - 1)
        order = z.argsort(dim=1, descending=True)
        out = x.clone()
        todo = torch.arange(len(x), device=x.device)
        for j in range(1, k + 1):
            for r in range(self.restarts if len(todo) else 0):
                if len(todo) == 0:
                    break
                t = target[todo] if target is not None else order[todo, j]
                cand, dist = self.run(model, x[todo], y[todo], t, gen, start=r > 0, targeted=target is not None)
                ok = dist <= self.eps * (1 + 1e-6)
                out[todo[ok]] = self._within_budget(x[todo[ok]], cand[ok])
                todo = todo[~ok]
        # boundary points are barely adversarial: keep only those that still succeed as returned
        pred = predict_logits(model, out).argmax(1)
        failed = (pred != target) if target is not None else (pred == y)
        out[failed] = x[failed]
        return out
