"""Per-sample attack losses shared by the evasion attacks: margins and the DLR loss (Croce & Hein, ICML 2020)."""
from __future__ import annotations

import torch


def other_max(z: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """max_{j != label} z_j per row."""
    return z.scatter(1, label.view(-1, 1), float("-inf")).amax(1)


def margin(z: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Distance to success, > 0 while the attack has not succeeded.

    Untargeted: z_y - max_{j != y} z_j. Targeted: max_{j != t} z_j - z_t.
    """
    if target is None:
        return z.gather(1, y.view(-1, 1)).squeeze(1) - other_max(z, y)
    return other_max(z, target) - z.gather(1, target.view(-1, 1)).squeeze(1)


def dlr_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted DLR loss -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3), to be maximised; scale invariant."""
    zs = z.sort(dim=1, descending=True).values
    return -margin(z, y) / (zs[:, 0] - zs[:, 2] + 1e-12)


def dlr_targeted_loss(z: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR loss -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), to be maximised."""
    zs = z.sort(dim=1, descending=True).values
    zy = z.gather(1, y.view(-1, 1)).squeeze(1)
    zt = z.gather(1, target.view(-1, 1)).squeeze(1)
    return -(zy - zt) / (zs[:, 0] - 0.5 * (zs[:, 2] + zs[:, 3]) + 1e-12)


def is_success(z: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    pred = z.argmax(1)
    return pred != y if target is None else pred == target
