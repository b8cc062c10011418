"""Total variance minimization (Guo, Rana, Cisse, van der Maaten, "Countering Adversarial Images using Input
Transformations", ICLR 2018)."""
from __future__ import annotations

import torch

from safedl.defenses.preprocess._base import Preprocessor
from safedl.registry import register
from safedl.utils.validate import check_fraction, check_positive


def total_variation(z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Isotropic TV per image (smoothed with eps so it is differentiable at flat regions)."""
    dh = z[..., 1:, :-1] - z[..., :-1, :-1]
    dw = z[..., :-1, 1:] - z[..., :-1, :-1]
    return torch.sqrt(dh**2 + dw**2 + eps).flatten(1).sum(1)


@register("preprocessor", "total_variance_minimization")
class TotalVarianceMinimization(Preprocessor):
    """Keep a random subset of pixels (each with probability ``keep_prob``), then reconstruct the image as
    argmin_z ||mask * (z - x)||_2 + lam * TV(z), solved for all images at once with ``steps`` Adam iterations.

    The random mask and the inner optimisation make it randomized and non-differentiable: adaptive attacks use
    BPDA (identity) with EOT.
    """

    differentiable = False
    randomized = True

    def __init__(self, *, keep_prob: float = 0.3, lam: float = 0.5, steps: int = 40, lr: float = 0.05,
                 seed: int | None = 0):
        super().__init__()
        self.keep_prob = float(check_fraction(self, "keep_prob", keep_prob))
        self.lam = float(check_positive(self, "lam", lam, allow_zero=True))
        self.steps = check_positive(self, "steps", steps, integer=True)
        self.lr = float(check_positive(self, "lr", lr))
        self.seed = seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        gen = self._generator(x.device)
        mask = (torch.rand(x.shape[0], 1, *x.shape[2:], generator=gen, device=x.device) < self.keep_prob).to(x.dtype)
        with torch.enable_grad():
            z = x.clone().requires_grad_(True)
            opt = torch.optim.Adam([z], lr=self.lr)
            for _ in range(self.steps):
                fit = (mask * (z - x)).flatten(1).norm(dim=1)
                loss = (fit + self.lam * total_variation(z)).sum()
                opt.zero_grad(set_to_none=True)
                (g,) = torch.autograd.grad(loss, z)
                z.grad = g
                opt.step()
                with torch.no_grad():
                    z.clamp_(0, 1)
        return z.detach()
