"""Evasion-attack contract: a small class with validated keyword-only config and ``__call__(model, x, y, *, target)``.

The call works in [0, 1] pixel space (normalization lives in the model), returns ``x_adv`` with x's shape, dtype and
device, and leaves the model's parameters, ``.grad`` and train/eval mode as it found them.
"""
from __future__ import annotations

import copy
from typing import Callable, ClassVar

import torch
from torch import nn

from safedl.errors import ConfigError
from safedl.utils.tensors import eval_mode, frozen_params
from safedl.utils.validate import check_choice, check_positive

NORMS = ("linf", "l2")


class EvasionAttack:
    """Base class of evasion attacks.

    ``access`` tells which threat models may run the attack: ``"white-box"`` (gradients), ``"scores"`` or
    ``"labels"`` (black-box through a counted query interface), ``"transfer"`` (a surrogate the attacker trains).
    After a call, ``queries_`` holds per-sample query counts for black-box attacks (None for white-box ones).
    """

    access: ClassVar[str] = "white-box"
    bounded: ClassVar[bool] = True  # False: a minimum-norm attack with no eps budget
    norm: str = "linf"
    eps: float = 0.0
    queries_: torch.Tensor | None = None
    #: True: the objective can take a per-sample penalty (``with_penalty``), e.g. for a detector-aware attack
    takes_penalty: ClassVar[bool] = False
    _penalty: Callable[[torch.Tensor], torch.Tensor] | None = None

    def with_penalty(self, penalty: Callable[[torch.Tensor], torch.Tensor]) -> "EvasionAttack":
        """A copy whose objective adds ``penalty(x_adv)`` (per sample, >= 0, zero when acceptable: e.g. every
        detector score at or below its threshold); success then needs the penalty at zero too."""
        if not self.takes_penalty:
            raise ConfigError(f"{self.registry_name}: its objective takes no penalty (takes_penalty is False)")
        out = copy.copy(self)
        for name in [k for k in vars(out) if k.endswith("_") and not k.startswith("_")]:
            delattr(out, name)  # fitted state (e.g. a universal patch) was made without the penalty: refit
        out._penalty = penalty
        return out

    def _init_norm_eps(self, norm: str, eps: float) -> None:
        self.norm = check_choice(self, "norm", norm, NORMS)
        self.eps = float(check_positive(self, "eps", eps))
        if norm == "linf" and eps > 1:
            raise ConfigError(f"{self.registry_name}: eps={eps!r} is larger than the [0, 1] pixel range for norm 'linf'")

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, target: torch.Tensor | None = None
                 ) -> torch.Tensor:
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"{self.registry_name}: x must be a float N x C x H x W tensor, got {tuple(x.shape)} {x.dtype}")
        if y.shape != (len(x),):
            raise ValueError(f"{self.registry_name}: y must have shape ({len(x)},), got {tuple(y.shape)}")
        if target is not None and target.shape != (len(x),):
            raise ValueError(f"{self.registry_name}: target must have shape ({len(x)},), got {tuple(target.shape)}")
        if len(x) == 0:
            return x.clone()
        with eval_mode(model), frozen_params(model):
            x_adv = self._attack(model, x.detach(), y.to(x.device), None if target is None else target.to(x.device))
        return x_adv.detach().to(dtype=x.dtype)

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def params(self) -> dict:
        """The validated config (public attributes not ending in '_')."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and not k.endswith("_")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def input_grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d loss / d x without touching any parameter's .grad."""
    (g,) = torch.autograd.grad(loss, x)
    return g
