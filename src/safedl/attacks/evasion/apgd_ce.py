"""APGD-CE: Auto-PGD on the cross-entropy loss (Croce & Hein, ICML 2020)."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from safedl.attacks.evasion._apgd import APGDBase
from safedl.registry import register


@register("evasion", "apgd_ce")
class APGDCE(APGDBase):
    """Auto-PGD with cross-entropy, L-inf or L2: momentum 0.75, step size 2*eps halved at checkpoints when the loss
    stalls, restarting from the best point. Targeted runs descend the cross-entropy of the target class."""

    conformance_params: ClassVar[dict] = {"eps": 0.3, "steps": 10}

    def _loss(self, z: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        if target is None:
            return F.cross_entropy(z, y, reduction="none")
        return -F.cross_entropy(z, target, reduction="none")
