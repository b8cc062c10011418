"""Jacobian-based dataset augmentation (Papernot, McDaniel, Goodfellow, Jha, Celik & Swami, "Practical Black-Box
Attacks against Machine Learning", AsiaCCS 2017, Algorithm 1)."""
from __future__ import annotations

from typing import Sequence

import torch

from safedl.attacks.extraction.base import ExtractionAttack, ExtractionOracle, ExtractionResult
from safedl.registry import register
from safedl.utils.tensors import eval_mode
from safedl.utils.validate import check_positive

_CHUNK = 512


@register("extraction", "jacobian_augmentation")
class JacobianAugmentation(ExtractionAttack):
    """A small seed set grown by Jacobian-based augmentation rounds: x' = clip(x + lambda * sign(dF_s[O(x)]/dx)).

    ``seed_size`` images from ``pool`` are queried; each round the surrogate F_s is (further) trained on every
    answer so far, and each set member moves by ``step`` along the sign of the surrogate's gradient for the label
    the victim gave; the new points are queried. As in the paper, the step's sign flips every ``tau`` rounds, and
    once the set would outgrow the budget only a seeded random subset of the new points is queried (the paper's
    reservoir sampling), so the oracle's budget is spent exactly. Scores are learned as soft labels.
    """

    def __init__(self, *, seed_size: int = 150, step: float = 0.1, tau: int = 3, surrogate: str = "small_cnn",
                 surrogate_params: dict | None = None, epochs: int = 10, lr: float = 1e-3, batch_size: int = 64,
                 pool: str = "train", budgets: Sequence[int] = (250, 500, 1000, 2000, 4000),
                 transfer_eps: float = 0.3, seed: int = 0):
        self.seed_size = check_positive(self, "seed_size", seed_size, integer=True)
        self.step = float(check_positive(self, "step", step))
        self.tau = check_positive(self, "tau", tau, integer=True)
        self._init_surrogate(surrogate=surrogate, surrogate_params=surrogate_params, epochs=epochs, lr=lr,
                             batch_size=batch_size, seed=seed)
        self._init_common(budgets=budgets, pool=pool, transfer_eps=transfer_eps)

    @staticmethod
    def jacobian_step(surrogate: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, lam: float) -> torch.Tensor:
        """x + lam * sign of the gradient of the surrogate's logit for ``labels``, clipped to [0, 1] (batched)."""
        out = []
        with eval_mode(surrogate):
            for i in range(0, len(x), _CHUNK):
                xb = x[i:i + _CHUNK].clone().requires_grad_(True)
                logit = surrogate(xb).gather(1, labels[i:i + _CHUNK].view(-1, 1)).sum()
                (grad,) = torch.autograd.grad(logit, xb)
                out.append((xb.detach() + lam * grad.sign()).clamp(0, 1))
        return torch.cat(out)

    def extract(self, oracle: ExtractionOracle, pool: torch.Tensor, *, num_classes: int,
                device: torch.device | str = "cpu") -> ExtractionResult:
        device = torch.device(device)
        g = torch.Generator().manual_seed(self.seed)
        n0 = min(self.seed_size, len(pool), oracle.remaining)
        x = pool[torch.randperm(len(pool), generator=g)[:n0]].to(device)
        answers = oracle(x)
        surrogate = self.fresh_surrogate(tuple(pool.shape[1:]), num_classes, pool).to(device)
        rho = 0
        while True:
            self.train_surrogate(surrogate, x, answers, oracle.output, num_classes=num_classes, device=device)
            if oracle.remaining <= 0:
                break
            labels = answers if oracle.output == "labels" else answers.argmax(1)
            lam = self.step * (-1) ** (rho // self.tau)
            new = self.jacobian_step(surrogate, x, labels.to(device), lam)
            if len(new) > oracle.remaining:
                new = new[torch.randperm(len(new), generator=g)[: oracle.remaining].to(device)]
            new_answers = torch.cat([oracle(new[i:i + _CHUNK]) for i in range(0, len(new), _CHUNK)])
            x, answers = torch.cat([x, new]), torch.cat([answers, new_answers])
            rho += 1
        self.rounds_ = rho
        return ExtractionResult(surrogate, oracle.log())
