"""APGD-DLR and APGD-T: Auto-PGD on the Difference-of-Logits-Ratio loss (Croce & Hein, ICML 2020)."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from safedl.attacks.base import make_generator
from safedl.attacks.evasion._apgd import APGDBase
from safedl.attacks.evasion._losses import dlr_loss, dlr_targeted_loss
from safedl.registry import register
from safedl.utils.tensors import predict_logits
from safedl.utils.validate import check_positive


@register("evasion", "apgd_dlr")
class APGDDLR(APGDBase):
    """Auto-PGD with the DLR loss, L-inf or L2.

    Untargeted by default. With ``target`` given, it maximises the targeted DLR loss towards it. With
    ``n_target_classes`` = k > 0 and no target, it is AutoAttack's APGD-T: targeted DLR runs towards each of the k
    highest-scoring wrong classes of the clean input in turn, each on the samples not yet broken.
    """

    conformance_params: ClassVar[dict] = {"eps": 0.3, "steps": 10}

    def __init__(self, *, eps: float = 0.3, norm: str = "linf", steps: int = 100, restarts: int = 1, rho: float = 0.75,
                 n_target_classes: int = 0, random_start: bool = True, early_stop: bool = True,
                 seed: int | None = 0):
        super().__init__(eps=eps, norm=norm, steps=steps, restarts=restarts, rho=rho, random_start=random_start,
                         early_stop=early_stop, seed=seed)
        self.n_target_classes = check_positive(self, "n_target_classes", n_target_classes, integer=True,
                                               allow_zero=True)

    def _loss(self, z: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        return dlr_loss(z, y) if target is None else dlr_targeted_loss(z, y, target)

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        gen = make_generator(self.seed, x.device)
        if target is not None or self.n_target_classes == 0:
            return self._restarts(model, x, y, target, gen)
        # APGD-T: the success criterion stays untargeted (any wrong label), the loss is targeted
        z = predict_logits(model, x)
        order = z.argsort(dim=1, descending=True)
        k = min(self.n_target_classes, z.shape[1] - 1)
        out = x.clone()
        todo = torch.arange(len(x), device=x.device)
        for j in range(1, k + 1):
            for r in range(self.restarts):
                t = order[todo, j]
                x_adv, _ = self.run(model, x[todo], y[todo], t, gen, start=self.random_start or r > 0)
                out[todo] = x_adv
                with torch.no_grad():
                    broken = model(x_adv).argmax(1) != y[todo]
                todo = todo[~broken]
                if len(todo) == 0:
                    return out
        return out
