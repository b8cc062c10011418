"""Interval bound propagation (Gowal et al., "On the Effectiveness of Interval Bound Propagation for Training
Verifiably Robust Models", arXiv:1810.12715, 2018; Mirman et al. 2018's box domain): sound elementwise bounds on a
network's activations over an L-inf ball, layer by layer, in centre/radius form.

Supported layers: Normalize, Linear, Conv2d, ReLU, Flatten, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, BatchNorm (eval
statistics), Identity and Dropout (identity in eval), composed by ``nn.Sequential`` or the zoo's body/classifier
networks (small_cnn, tiny_cnn, mlp). Any other module is refused with its path and type: IBP must know every layer
to stay sound.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from safedl.errors import ConfigError
from safedl.models.normalize import Normalize
from safedl.models.zoo import MLP, SmallCNN, TinyCNN

SUPPORTED = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
             nn.BatchNorm1d, nn.BatchNorm2d, nn.Identity, nn.Dropout, Normalize)
#: zoo networks whose forward is ``classifier(body(x))``
BODY_CLASSIFIER = (SmallCNN, TinyCNN, MLP)


def layers(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The model as a flat list of (path, layer) in forward order; ConfigError for a layer IBP cannot bound."""
    if isinstance(model, nn.Sequential):
        return [item for name, m in model.named_children() for item in layers(m, f"{prefix}{name}.")]
    if isinstance(model, BODY_CLASSIFIER):
        return layers(model.body, f"{prefix}body.") + layers(model.classifier, f"{prefix}classifier.")
    if isinstance(model, SUPPORTED):
        return [(prefix.rstrip("."), model)]
    allowed = ", ".join(t.__name__ for t in SUPPORTED)
    raise ConfigError(f"ibp: layer {prefix.rstrip('.') or '(model)'!r} is a {type(model).__name__}, which interval "
                      f"bound propagation does not support; supported: {allowed}, in nn.Sequential or the zoo's "
                      "small_cnn, tiny_cnn and mlp")


def _affine(layer: nn.Module, mu: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre and radius through an affine layer: W mu + b and |W| r."""
    if isinstance(layer, nn.Linear):
        return F.linear(mu, layer.weight, layer.bias), F.linear(r, layer.weight.abs())
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            raise ConfigError(f"ibp: Conv2d with padding_mode={layer.padding_mode!r} is not supported (only 'zeros')")
        args = (layer.stride, layer.padding, layer.dilation, layer.groups)
        return F.conv2d(mu, layer.weight, layer.bias, *args), F.conv2d(r, layer.weight.abs(), None, *args)
    if isinstance(layer, Normalize):
        return (mu - layer.mean) / layer.std, r / layer.std
    # batch norm with its running statistics: a per-channel scale and shift
    scale = layer.weight / torch.sqrt(layer.running_var + layer.eps) if layer.affine else \
        1 / torch.sqrt(layer.running_var + layer.eps)
    shift = (layer.bias if layer.affine else 0) - layer.running_mean * scale
    shape = (1, -1) + (1,) * (mu.ndim - 2)
    return mu * scale.view(shape) + shift.view(shape), r * scale.abs().view(shape)


def propagate(layer: nn.Module, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of one layer's output given elementwise bounds ``lo <= x <= hi`` of its input."""
    if isinstance(layer, (nn.Linear, nn.Conv2d, Normalize, nn.BatchNorm1d, nn.BatchNorm2d)):
        if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)) and layer.training:
            raise ConfigError("ibp: batch norm must be in eval mode (its batch statistics depend on the input)")
        mu, r = _affine(layer, (hi + lo) / 2, (hi - lo) / 2)
        return mu - r, mu + r
    # monotone elementwise or pooling maps (averages have positive weights): bound by the images of the bounds
    if isinstance(layer, (nn.Dropout, nn.Identity)):
        return lo, hi
    return layer(lo), layer(hi)


def interval_bounds(model: nn.Module, x: torch.Tensor, eps: float, *, upto: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise bounds of the outputs of ``model`` (of its first ``upto`` layers) over every input within L-inf
    distance ``eps`` of ``x`` and inside [0, 1]."""
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    for _, layer in layers(model)[:upto]:
        lo, hi = propagate(layer, lo, hi)
    return lo, hi


def margin_lower_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """N x K lower bounds of z_y - z_j over the eps-ball (0 in column y), with the last linear layer folded into the
    specification (Gowal et al. Sec. 3: ``c^T (W h + b)`` bounded through ``c^T W``), tighter than logit bounds."""
    seq = layers(model)
    last = seq[-1][1]
    if not isinstance(last, nn.Linear):
        lo, hi = interval_bounds(model, x, eps)
        out = lo.gather(1, y.view(-1, 1)) - hi
        return out.scatter(1, y.view(-1, 1), 0.0)
    lo, hi = interval_bounds(model, x, eps, upto=len(seq) - 1)
    mu, r = (hi + lo) / 2, (hi - lo) / 2
    w_diff = last.weight[y].unsqueeze(1) - last.weight.unsqueeze(0)  # N x K x D: rows w_y - w_j
    b = last.bias if last.bias is not None else torch.zeros(last.out_features, device=x.device, dtype=x.dtype)
    b_diff = b[y].unsqueeze(1) - b.unsqueeze(0)
    return torch.einsum("nkd,nd->nk", w_diff, mu) - torch.einsum("nkd,nd->nk", w_diff.abs(), r) + b_diff


def verified(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Bool N: the label ``y`` provably wins against every other class over the whole eps-ball."""
    m = margin_lower_bounds(model, x, y, eps)
    m = m.scatter(1, y.view(-1, 1), float("inf"))
    return (m > 0).all(1)
