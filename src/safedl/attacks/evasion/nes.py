"""NES: score-based attack with natural-evolution-strategies gradient estimates (Ilyas, Engstrom, Athalye & Lin,
"Black-box Adversarial Attacks with Limited Queries and Information", ICML 2018)."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from safedl.attacks.base import EvasionAttack, make_generator
from safedl.attacks.evasion._losses import margin
from safedl.attacks.evasion._lp import project, steepest_step
from safedl.attacks.query import QueryInterface
from safedl.registry import register
from safedl.utils.validate import check_positive

_CHUNK = 8192  # images per model call, to bound memory on large batches


@register("evasion", "nes")
class NES(EvasionAttack):
    """Projected gradient descent on the score margin (log-probability margin = logit margin) whose gradient is
    estimated from ``samples`` antithetic Gaussian pairs: g = sum_i (L(x + sigma u_i) - L(x - sigma u_i)) u_i /
    (2 sigma samples). Each iteration costs 2 * samples + 1 queries per unbroken sample (the +1 checks the new
    point); it stops per sample on success or when the next iteration would exceed ``max_queries``.
    ``alpha`` defaults to eps / 10 (L-inf) or eps / 5 (L2).
    """

    access: ClassVar[str] = "scores"
    conformance_params: ClassVar[dict] = {"eps": 0.3, "max_queries": 210, "samples": 10, "sigma": 0.01}

    def __init__(self, *, eps: float = 0.3, norm: str = "linf", max_queries: int = 10000, samples: int = 50,
                 sigma: float = 0.001, alpha: float | None = None, seed: int | None = 0):
        self._init_norm_eps(norm, eps)
        self.max_queries = check_positive(self, "max_queries", max_queries, integer=True)
        self.samples = check_positive(self, "samples", samples, integer=True)
        self.sigma = float(check_positive(self, "sigma", sigma))
        self.alpha = None if alpha is None else float(check_positive(self, "alpha", alpha))
        self.seed = seed

    @property
    def step_size(self) -> float:
        """``alpha``, or eps / 10 (L-inf) or eps / 5 (L2) when it is None."""
        return self.eps / (10 if self.norm == "linf" else 5) if self.alpha is None else self.alpha

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        gen = make_generator(self.seed, x.device)
        qi = QueryInterface(model, n=len(x), output="scores", budget=self.max_queries, device=x.device)

        def loss(xq: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            scores = torch.cat([qi(xq[i:i + _CHUNK], idx[i:i + _CHUNK]) for i in range(0, len(xq), _CHUNK)])
            return margin(scores.clamp_min(1e-30).log(), y[idx], None if target is None else target[idx])

        all_idx = torch.arange(len(x), device=x.device)
        x_adv = x.clone()
        m = loss(x_adv, all_idx)
        cost = 2 * self.samples + 1
        while True:
            idx = all_idx[(m > 0) & (qi.remaining() >= cost)]
            if len(idx) == 0:
                break
            xa = x_adv[idx]
            u = torch.randn((len(idx), self.samples) + tuple(x.shape[1:]), generator=gen, device=x.device, dtype=x.dtype)
            u = torch.cat([u, -u], 1)  # antithetic pairs
            probes = (xa.unsqueeze(1) + self.sigma * u).flatten(0, 1)
            lp = loss(probes, idx.repeat_interleave(2 * self.samples)).view(len(idx), 2 * self.samples)
            # the margin is minimised, so the ascent direction of the attack loss is -grad(margin)
            g = -(lp.view(len(idx), -1, *([1] * (x.ndim - 1))) * u).mean(1) / self.sigma
            delta = project(xa + self.step_size * steepest_step(g, self.norm) - x[idx], self.norm, self.eps)
            x_adv[idx] = (x[idx] + delta).clamp(0, 1)
            m[idx] = loss(x_adv[idx], idx)
        self.queries_ = qi.counts.clone()
        return x_adv
