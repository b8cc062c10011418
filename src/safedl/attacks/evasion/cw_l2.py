"""Carlini-Wagner L2 (Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017)."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from safedl.attacks.base import EvasionAttack
from safedl.attacks.evasion._losses import margin
from safedl.registry import register
from safedl.utils.validate import check_positive


@register("evasion", "cw_l2")
class CarliniWagnerL2(EvasionAttack):
    """Minimum-L2 attack: x' = (tanh(w) + 1) / 2 with w started at atanh of the input, Adam on
    ||x' - x||^2 + c * max(margin, -kappa), and a per-sample binary search over c.

    Each sample returns its smallest-L2 successful point over the whole search, or the input if none was found.
    ``bounded`` is False: the perturbation is minimised, not held to an eps budget. ``lr`` defaults to 0.05 (the
    paper used 0.01 with up to 10,000 steps; with 100 steps 0.01 leaves many samples unbroken).
    """

    bounded: ClassVar[bool] = False
    conformance_params: ClassVar[dict] = {"steps": 30, "binary_search_steps": 3, "lr": 0.05}

    def __init__(self, *, confidence: float = 0.0, initial_const: float = 0.01, binary_search_steps: int = 9,
                 steps: int = 100, lr: float = 0.05, abort_early: bool = True):
        self.norm = "l2"
        self.confidence = float(check_positive(self, "confidence", confidence, allow_zero=True))
        self.initial_const = float(check_positive(self, "initial_const", initial_const))
        self.binary_search_steps = check_positive(self, "binary_search_steps", binary_search_steps, integer=True)
        self.steps = check_positive(self, "steps", steps, integer=True)
        self.lr = float(check_positive(self, "lr", lr))
        self.abort_early = bool(abort_early)

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        n = len(x)
        # the (1 - 1e-6) keeps atanh finite on pixels at exactly 0 or 1
        w0 = torch.atanh((2 * x - 1) * (1 - 1e-6))
        lower = torch.zeros(n, device=x.device)
        upper = torch.full((n,), 1e10, device=x.device)
        const = torch.full((n,), self.initial_const, device=x.device)
        best_l2 = torch.full((n,), float("inf"), device=x.device)
        best_x = x.clone()
        for _ in range(self.binary_search_steps):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=self.lr)
            succeeded = torch.zeros(n, dtype=torch.bool, device=x.device)
            prev = float("inf")
            for step in range(self.steps):
                x_new = (torch.tanh(w) + 1) / 2
                z = model(x_new)
                l2sq = (x_new - x).flatten(1).pow(2).sum(1)
                m = margin(z, y, target)
                loss = (l2sq + const * (m + self.confidence).clamp_min(0)).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    # the reported point is the one evaluated before this update
                    ok = m.detach() < -self.confidence
                    improve = ok & (l2sq.detach() < best_l2)
                    best_l2 = torch.where(improve, l2sq.detach(), best_l2)
                    best_x[improve] = x_new.detach()[improve]
                    succeeded |= ok
                if self.abort_early and step % max(1, self.steps // 10) == 0:
                    if float(loss.detach()) > prev * 0.9999:
                        break
                    prev = float(loss.detach())
            # binary search on c: shrink it where the attack succeeded, grow it where it did not
            upper = torch.where(succeeded, torch.minimum(upper, const), upper)
            lower = torch.where(succeeded, lower, torch.maximum(lower, const))
            const = torch.where(upper < 1e9, (lower + upper) / 2, const * 10)
        return best_x
