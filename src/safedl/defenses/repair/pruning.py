"""Activation pruning: remove the units of a layer that are least active on clean data (the pruning step of
Liu, Dolan-Gavitt & Garg, "Fine-Pruning", RAID 2018, without a stopping rule or fine-tuning).

``scope="last_conv"`` prunes output channels of the last convolution (the paper's choice; the profile also accepts
``last_layer_only: true``); ``scope="penultimate"`` prunes the features feeding the classifier; ``scope="all_layers"``
(the profile also accepts ``all_layers: true``; our variant) prunes every convolution in forward order, each by its
own clean activations measured after the earlier ones were pruned. The ``pruning_ratio`` share of units with the
lowest mean clean activation is masked to zero in each pruned layer.
"""
from __future__ import annotations

from typing import ClassVar

import copy

import torch
from torch import nn

from safedl.data.dataset import Dataset
from safedl.defenses.repair._common import classifier, last_conv, make_permanent, mask_units, mean_activation
from safedl.registry import register
from safedl.utils.validate import check_choice, check_fraction


@register("repair", "pruning")
class Pruning:
    """Prune the ``pruning_ratio`` least-active units (on clean data) of the last conv or penultimate layer."""

    @property
    def model_needs(self) -> tuple[str, ...]:
        """What the model must offer (safedl.models.features.model_problems): a conv layer or a linear head."""
        return ("head",) if self.scope == "penultimate" else ("conv",)
    trusted_data: ClassVar[str] = "required"
    report_: dict = {}

    def diagnostic_images(self) -> dict[str, tuple[torch.Tensor, list[str]]]:
        """No images (RepairProtocol)."""
        return {}

    def __init__(self, *, pruning_ratio: float = 0.3, scope: str = "last_conv"):
        self.pruning_ratio = check_fraction(self, "pruning_ratio", pruning_ratio, allow_zero=True, allow_one=False)
        self.scope = check_choice(self, "scope", scope, ("last_conv", "penultimate", "all_layers"))

    def repair(self, model: nn.Module, *, clean: Dataset, device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
        m = copy.deepcopy(model).to(device).eval()
        if self.scope == "all_layers":
            layers = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
            if not layers:
                last_conv(m)  # raises the ConfigError naming the model
        else:
            layers = [last_conv(m) if self.scope == "last_conv" else classifier(m)]
        units, pruned_units = 0, []
        for layer in layers:
            act = mean_activation(m, layer, clean.x)
            k = int(round(self.pruning_ratio * len(act)))
            pruned = torch.argsort(act)[:k]
            mask_units(layer, pruned, inputs=self.scope == "penultimate")
            units += len(act)
            pruned_units.append(pruned.tolist())
        self.report_ = {"scope": self.scope, "units": units, "pruned": sum(map(len, pruned_units)),
                        "layers": len(layers),
                        "pruned_units": pruned_units[0] if len(layers) == 1 else pruned_units}
        return make_permanent(m).eval()
