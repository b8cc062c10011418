"""Shared base of input preprocessors: flags that tell adaptive attacks how to get gradients through them."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class Preprocessor(nn.Module):
    """An input transformation in [0, 1] pixel space, N x C x H x W -> same shape.

    ``differentiable``: autograd through ``forward`` gives useful gradients; otherwise adaptive attacks use BPDA
    (Athalye et al. 2018) through ``approximation`` (identity unless a subclass has a smooth surrogate).
    ``randomized``: each call draws fresh randomness, so adaptive attacks average over it (EOT).
    ``needs_fit``: learned from clean images first (``fit(x_clean, *, seed) -> self``, e.g. MagNet's reformer).
    """

    differentiable: ClassVar[bool] = True
    randomized: ClassVar[bool] = False
    needs_fit: ClassVar[bool] = False

    def approximation(self, x: torch.Tensor) -> torch.Tensor:
        """A differentiable surrogate of ``forward`` for BPDA's backward pass (identity by default)."""
        return x

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "training")

    def _generator(self, device: torch.device) -> torch.Generator | None:
        """A generator seeded once from ``seed`` (None: torch's global RNG), kept per device."""
        seed = getattr(self, "seed", None)
        if seed is None:
            return None
        gens = self.__dict__.setdefault("_gens", {})
        key = str(device)
        if key not in gens:
            g = torch.Generator(device=device)
            g.manual_seed(int(seed))
            gens[key] = g
        return gens[key]
