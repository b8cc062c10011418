"""HopSkipJump (Chen, Jordan & Wainwright, "HopSkipJumpAttack: A Query-Efficient Decision-Based Attack",
IEEE S&P 2020): decision-based, sees predicted labels only, L2 and L-inf."""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from safedl.attacks.base import NORMS, EvasionAttack, make_generator
from safedl.attacks.evasion._lp import project
from safedl.attacks.query import QueryInterface
from safedl.registry import register
from safedl.utils.validate import check_choice, check_positive


@register("evasion", "hopskipjump")
class HopSkipJump(EvasionAttack):
    """Start from a uniform-noise image the model already gets wrong, then repeat: binary search to the decision
    boundary, estimate the boundary's normal from the signs of ``init_evals * sqrt(t)`` random probes (a
    baseline-corrected Monte Carlo estimate), take a geometric step of size dist / sqrt(t) along it (its sign for
    L-inf) and binary search back to the boundary.

    Every point it keeps is adversarial, so running out of ``max_queries`` mid-iteration is safe. Unbounded (the
    perturbation is minimised) unless ``eps`` is given: then a sample stops once its distance is within eps, and a
    sample still outside is projected onto the eps-ball at the end. Samples already misclassified (one query each)
    or with no adversarial start are returned unchanged.
    """

    access: ClassVar[str] = "labels"
    conformance_params: ClassVar[dict] = {"max_queries": 300, "init_evals": 20}

    def __init__(self, *, norm: str = "l2", max_queries: int = 5000, steps: int = 64, init_evals: int = 100,
                 max_evals: int = 10000, gamma: float = 1.0, init_tries: int = 100, eps: float | None = None,
                 seed: int | None = 0):
        self.norm = check_choice(self, "norm", norm, NORMS)
        self.max_queries = check_positive(self, "max_queries", max_queries, integer=True)
        self.steps = check_positive(self, "steps", steps, integer=True)
        self.init_evals = check_positive(self, "init_evals", init_evals, integer=True)
        self.max_evals = check_positive(self, "max_evals", max_evals, integer=True)
        self.gamma = float(check_positive(self, "gamma", gamma))
        self.init_tries = check_positive(self, "init_tries", init_tries, integer=True)
        self.eps = None if eps is None else float(check_positive(self, "eps", eps))
        self.seed = seed

    @property
    def bounded(self) -> bool:
        return self.eps is not None

    def _dist(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = (a - b).flatten(1)
        return d.norm(dim=1) if self.norm == "l2" else d.abs().amax(1)

    def _blend(self, x: torch.Tensor, p: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """The point at 'distance' alpha from x towards p: a convex blend (L2) or a clip to the alpha-box (L-inf)."""
        a = alpha.view((-1,) + (1,) * (x.ndim - 1))
        if self.norm == "l2":
            return (1 - a) * x + a * p
        return torch.minimum(torch.maximum(p, x - a), x + a)

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        gen = make_generator(self.seed, x.device)
        qi = QueryInterface(model, n=len(x), output="labels", budget=self.max_queries, device=x.device)
        n, d = len(x), x[0].numel()
        view = (-1,) + (1,) * (x.ndim - 1)
        theta = self.gamma / (d * math.sqrt(d)) if self.norm == "l2" else self.gamma / d ** 2

        def adversarial(xq: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            pred = qi(xq, idx)
            return pred != y[idx] if target is None else pred == target[idx]

        def has_budget(idx: torch.Tensor, k: int = 1) -> torch.Tensor:
            return qi.remaining(idx) >= k

        # 0. a sample the model already gets wrong needs no perturbation (one query each)
        done = adversarial(x, torch.arange(n, device=x.device))
        # 1. adversarial starting points, moved to the boundary
        x_cur, found = self._starting_points(x, done, gen, adversarial, has_budget)
        active = torch.nonzero(found).flatten()
        if len(active):
            x_cur[active] = self._binary_search(x[active], x_cur[active], active, adversarial, has_budget, theta,
                                                init=True)
        dist = self._dist(x_cur, x)
        # 2. iterations
        for t in range(1, self.steps + 1):
            num_evals = int(min(self.init_evals * math.sqrt(t), self.max_evals))
            keep = found & has_budget(torch.arange(n, device=x.device), num_evals + 1)
            if self.eps is not None:
                keep &= dist > self.eps
            idx = torch.nonzero(keep).flatten()
            if len(idx) == 0:
                break
            xs, dd = x_cur[idx], dist[idx]
            if t == 1:
                delta = torch.full_like(dd, 0.1)
            else:
                delta = (math.sqrt(d) if self.norm == "l2" else d) * theta * dd
            grad = self._boundary_normal(xs, idx, delta, num_evals, gen, adversarial)
            update = grad if self.norm == "l2" else grad.sign()
            new, moved = self._geometric_step(xs, idx, dd / math.sqrt(t), update, adversarial, has_budget)
            if bool(moved.any()):
                m = idx[moved]
                x_cur[m] = self._binary_search(x[m], new[moved], m, adversarial, has_budget, theta)
            dist = self._dist(x_cur, x)
        out = torch.where(found.view(view), x_cur, x)
        if self.eps is not None:
            out = (x + project(out - x, self.norm, self.eps)).clamp(0, 1)
        self.queries_ = qi.counts.clone()
        return out

    def _starting_points(self, x: torch.Tensor, done: torch.Tensor, gen: torch.Generator, adversarial, has_budget
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniform noise, redrawn (up to ``init_tries`` times) for samples that are not yet adversarial; returns the
        starting points (x where none was found) and the mask of samples that have one."""
        n = len(x)
        x_cur = x.clone()
        found = torch.zeros(n, dtype=torch.bool, device=x.device)
        for _ in range(self.init_tries):
            idx = torch.nonzero(~found & ~done & has_budget(torch.arange(n, device=x.device))).flatten()
            if len(idx) == 0:
                break
            noise = torch.rand(x[idx].shape, generator=gen, device=x.device, dtype=x.dtype)
            ok = adversarial(noise, idx)
            x_cur[idx[ok]] = noise[ok]
            found[idx[ok]] = True
        return x_cur, found

    def _boundary_normal(self, xs: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor, num_evals: int,
                         gen: torch.Generator, adversarial) -> torch.Tensor:
        """The unit gradient-direction estimate at the boundary points ``xs`` from label flips of random probes."""
        view = (-1,) + (1,) * (xs.ndim - 1)
        shape = (len(idx), num_evals) + tuple(xs.shape[1:])
        if self.norm == "l2":
            rv = torch.randn(shape, generator=gen, device=xs.device, dtype=xs.dtype)
        else:
            rv = torch.rand(shape, generator=gen, device=xs.device, dtype=xs.dtype) * 2 - 1
        rv = rv / rv.flatten(2).norm(dim=2).clamp_min(1e-12).view(len(idx), num_evals, *([1] * (xs.ndim - 1)))
        dv = delta.clamp_min(1e-12).view(-1, 1, *([1] * (xs.ndim - 1)))
        probes = (xs.unsqueeze(1) + dv * rv).clamp(0, 1)
        rv = (probes - xs.unsqueeze(1)) / dv
        fval = adversarial(probes.flatten(0, 1), idx.repeat_interleave(num_evals)).view(len(idx), num_evals)
        fval = fval.to(xs.dtype) * 2 - 1
        mean = fval.mean(1, keepdim=True)
        # baseline subtraction except where every probe agrees (then the plain mean is the estimate)
        unanimous = mean.abs() == 1
        fval = torch.where(unanimous, fval, fval - mean)
        grad = (fval.view(len(idx), num_evals, *([1] * (xs.ndim - 1))) * rv).mean(1)
        return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)

    def _geometric_step(self, xs: torch.Tensor, idx: torch.Tensor, step: torch.Tensor, update: torch.Tensor,
                        adversarial, has_budget) -> tuple[torch.Tensor, torch.Tensor]:
        """Step along ``update``, halving the step until it lands on the adversarial side (at most 30 halvings);
        returns the new points and the mask of those that moved."""
        view = (-1,) + (1,) * (xs.ndim - 1)
        pending = torch.ones(len(idx), dtype=torch.bool, device=xs.device)
        new = xs.clone()
        for _ in range(30):
            sub = torch.nonzero(pending & has_budget(idx)).flatten()
            if len(sub) == 0:
                break
            cand = (xs[sub] + step[sub].view(view) * update[sub]).clamp(0, 1)
            ok = adversarial(cand, idx[sub])
            new[sub[ok]] = cand[ok]
            pending[sub[ok]] = False
            step[sub[~ok]] /= 2
            pending &= has_budget(idx)
        return new, ~pending

    def _binary_search(self, x: torch.Tensor, p: torch.Tensor, idx: torch.Tensor, adversarial, has_budget,
                       theta: float, init: bool = False) -> torch.Tensor:
        """Per-sample bisection between x (clean side) and the adversarial p; returns the adversarial end."""
        if self.norm == "l2" or init:
            high = torch.ones(len(x), device=x.device, dtype=x.dtype)
            thr = torch.full_like(high, theta if not init else 1e-3)
            if self.norm == "linf" and init:
                high = self._dist(p, x)
                thr = torch.clamp(high * 1e-3, max=1e-3)
        else:
            high = self._dist(p, x)
            thr = torch.clamp(high * theta, max=theta)
        low = torch.zeros_like(high)
        while True:
            sub = torch.nonzero(((high - low) > thr) & has_budget(idx)).flatten()
            if len(sub) == 0:
                break
            mid = (high[sub] + low[sub]) / 2
            ok = adversarial(self._blend(x[sub], p[sub], mid), idx[sub])
            high[sub] = torch.where(ok, mid, high[sub])
            low[sub] = torch.where(ok, low[sub], mid)
        return self._blend(x, p, high)
