"""L-inf / L2 geometry shared by gradient attacks: steepest-ascent steps, projections, random starts."""
from __future__ import annotations

from typing import Any, Callable

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


def pgd_steps(x: torch.Tensor, delta: torch.Tensor, loss_fn: Callable[[torch.Tensor], Any], *, steps: int,
              alpha: float, norm: str, eps: float, ascend: bool = True,
              on_step: Callable[[torch.Tensor, Any], None] | None = None) -> torch.Tensor:
    """The one projected-gradient loop every PGD-style method shares (Madry et al. 2018).

    Each step takes the gradient of ``loss_fn(x + delta)`` (a per-sample or scalar loss; or a tuple whose first
    item is the loss and whose second is passed to ``on_step`` with the detached iterate), moves ``alpha`` along
    the steepest ascent (``ascend``) or descent direction of ``norm``, clips to the [0, 1] box and projects onto
    the eps-ball (ART's order). Returns the final perturbation. The caller sets eval mode and freezes parameters.
    """
    sign = 1.0 if ascend else -1.0
    for _ in range(steps):
        xa = (x + delta).requires_grad_(True)
        out = loss_fn(xa)
        loss, aux = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
        if on_step is not None:
            on_step(xa.detach(), aux)
        (g,) = torch.autograd.grad(loss.sum(), xa)
        delta = (x + delta + sign * alpha * steepest_step(g, norm)).clamp(0, 1) - x
        delta = project(delta, norm, eps)
    return delta.detach()
