"""Helpers shared by model repairs: locate layers of a zoo model, measure clean activations, mask units."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune

from safedl.errors import ConfigError
from safedl.models.normalize import unwrap
from safedl.utils.tensors import eval_mode, model_device


def last_conv(model: nn.Module) -> nn.Conv2d:
    """The last Conv2d of the network (SmallCNN: the last one in ``.conv``)."""
    net = unwrap(model)
    scope = net.conv if hasattr(net, "conv") else net
    convs = [m for m in scope.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ConfigError(f"{type(net).__name__} has no Conv2d layer to prune")
    return convs[-1]


def classifier(model: nn.Module) -> nn.Linear:
    """The classifier head: the model's last nn.Linear (``safedl.models.features.last_linear``)."""
    from safedl.models.features import last_linear

    return last_linear(model)


@torch.no_grad()
def mean_activation(model: nn.Module, layer: nn.Module, x: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Mean post-ReLU activation of each output unit/channel of ``layer`` (or of the classifier's inputs) on x."""
    acts: list[torch.Tensor] = []
    is_clf = isinstance(layer, nn.Linear)

    def hook(_m, inp, out):
        a = inp[0] if is_clf else torch.relu(out)
        acts.append(a.flatten(2).mean(2).sum(0) if a.ndim == 4 else a.sum(0))

    h = layer.register_forward_hook(hook)
    dev = model_device(model)
    try:
        with eval_mode(model):
            for i in range(0, len(x), batch_size):
                model(x[i : i + batch_size].to(dev))
    finally:
        h.remove()
    return (torch.stack(acts).sum(0) / max(1, len(x))).cpu()


def mask_units(layer: nn.Module, units: torch.Tensor, *, inputs: bool = False) -> None:
    """Prune output channels of a conv/linear layer (or input features of a linear one) with a persistent mask, so
    fine-tuning cannot revive them (torch.nn.utils.prune keeps weight = weight_orig * mask)."""
    w = layer.weight
    mask = torch.ones_like(w)
    units = units.to(w.device).long()
    if inputs:
        mask[:, units] = 0
    else:
        mask[units] = 0
    if prune.is_pruned(layer):
        mask = mask * layer.weight_mask
        prune.remove(layer, "weight")
    prune.custom_from_mask(layer, "weight", mask)
    if not inputs and getattr(layer, "bias", None) is not None:
        bmask = torch.ones_like(layer.bias)
        bmask[units] = 0
        if hasattr(layer, "bias_mask"):
            bmask = bmask * layer.bias_mask
            prune.remove(layer, "bias")
        prune.custom_from_mask(layer, "bias", bmask)


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold pruning masks into plain weights so the state_dict has the original keys."""
    for m in model.modules():
        for name in ("weight", "bias"):
            if hasattr(m, f"{name}_mask"):
                prune.remove(m, name)
    return model
