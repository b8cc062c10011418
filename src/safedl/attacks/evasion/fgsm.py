"""FGSM: one signed-gradient step (Goodfellow et al., "Explaining and Harnessing Adversarial Examples", ICLR 2015)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from safedl.attacks.base import EvasionAttack, input_grad
from safedl.attacks.evasion._lp import steepest_step
from safedl.registry import register


@register("evasion", "fgsm")
class FGSM(EvasionAttack):
    """Fast Gradient (Sign) Method, L-inf or L2 (normalized gradient), untargeted or targeted."""

    def __init__(self, *, eps: float = 0.3, norm: str = "linf"):
        self._init_norm_eps(norm, eps)

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        x = x.clone().requires_grad_(True)
        logits = model(x)
        # Untargeted: climb the loss of the true label; targeted: descend the loss of the target label.
        loss = F.cross_entropy(logits, y, reduction="sum") if target is None else -F.cross_entropy(logits, target, reduction="sum")
        g = input_grad(loss, x)
        return (x.detach() + self.eps * steepest_step(g, self.norm)).clamp(0, 1)
