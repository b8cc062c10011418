"""Input attributions of a classifier's logit through Captum (Kokhlikyan et al. 2020; the ``explain`` extra):
integrated gradients (Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep Networks", ICML 2017) from a black
baseline along the straight path, Gauss-Legendre quadrature with ``steps`` points, batched; and the gradient
saliency map (Simonyan, Vedaldi & Zisserman 2014, |d logit / d x|). IG's completeness axiom: the attributions of an
input sum to f(x) - f(baseline) of the explained logit; ``delta`` is the quadrature's error on that sum.
The model's parameters, gradients and train/eval mode are left as they were."""
from __future__ import annotations

import torch
from torch import nn

from safedl.errors import ConfigError
from safedl.utils.tensors import eval_mode


def _captum():
    try:
        import captum.attr as attr
    except ImportError:
        raise ConfigError("explanations need Captum: pip install 'safedl[explain]'") from None
    return attr


def available() -> bool:
    """True when Captum is installed (the report's explanation figures need it)."""
    try:
        _captum()
    except ConfigError:
        return False
    return True


def integrated_gradients(model: nn.Module, x: torch.Tensor, *, target: torch.Tensor, steps: int = 64,
                         baseline: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(attributions shaped like ``x``, per-input completeness error ``delta``) for the logit of ``target``."""
    attr = _captum()
    base = torch.zeros_like(x) if baseline is None else baseline
    with eval_mode(model):
        ig = attr.IntegratedGradients(model)
        a, delta = ig.attribute(x, baselines=base, target=target, n_steps=int(steps), method="gausslegendre",
                                internal_batch_size=max(1, len(x)) * int(steps), return_convergence_delta=True)
    return a.detach(), delta.detach()


def saliency(model: nn.Module, x: torch.Tensor, *, target: torch.Tensor) -> torch.Tensor:
    """|d logit_target / d x| per input."""
    attr = _captum()
    with eval_mode(model):
        return attr.Saliency(model).attribute(x, target=target, abs=True).detach()
