"""L-inf / L2 geometry shared by gradient attacks: steepest-ascent steps, projections, random starts."""
from __future__ import annotations

import torch


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.ndim - 1)))


def steepest_step(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Unit steepest-ascent direction: sign for L-inf, g / ||g||_2 for L2."""
    return grad.sign() if norm == "linf" else grad / _flat_norm(grad)


def project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project a perturbation onto the eps-ball."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    factor = (eps / _flat_norm(delta)).clamp(max=1.0)
    return delta * factor


def random_start(x: torch.Tensor, norm: str, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    """A uniform point in the L-inf ball, or a uniform point in the L2 ball (Gaussian direction, radius eps*u^(1/d))."""
    if norm == "linf":
        delta = (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    else:
        d = x[0].numel()
        v = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        r = torch.rand((len(x),) + (1,) * (x.ndim - 1), generator=generator, device=x.device, dtype=x.dtype) ** (1.0 / d)
        delta = v / _flat_norm(v) * r * eps
    return (x + delta).clamp(0, 1) - x
