"""What every robust trainer shares: the architecture it trains and the facts it reports (see TrainerProtocol)."""
from __future__ import annotations

from typing import Any

from torch import nn


class Trainer:
    """Base of trainers. ``architecture(model)`` is the structure ``fit`` trains (the input's own unless a trainer
    must change layers, e.g. DP-SGD's GroupNorm): a cached or deployed model is rebuilt through it before its
    weights are loaded. ``facts()`` are the numbers a run reports about the training (e.g. epsilon spent)."""

    def architecture(self, model: nn.Module) -> nn.Module:
        return model

    def facts(self) -> dict[str, Any]:
        return {}

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and not k.endswith("_")}
