"""An ensemble of independently trained models whose softmax outputs are averaged (Strauss, Hanselmann, Junginger
& Ulmer, "Ensemble Methods as a Defense to Adversarial Perturbations Against Deep Neural Networks", 2017: members
from different random initialisations, outputs averaged). Attacked as a whole: white-box attacks differentiate
through the average."""
from __future__ import annotations

import copy

import torch
from torch import nn

from safedl.data.dataset import Dataset
from safedl.defenses.train._base import Trainer
from safedl.models.train import TrainRecipe, train_model
from safedl.registry import register
from safedl.utils.validate import check_range


class AveragedEnsemble(nn.Module):
    """log of the mean of the members' softmax outputs (so softmax of the output is the averaged probabilities)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(x).softmax(1) for m in self.members]).mean(0)
        return probs.clamp_min(1e-12).log()


def reinitialise(model: nn.Module, seed: int) -> nn.Module:
    """``model`` with every layer's parameters drawn afresh from ``seed`` (layers' own ``reset_parameters``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return model


@register("trainer", "model_ensemble")
class ModelEnsemble(Trainer):
    """Train ``members`` copies of the model with the baseline recipe, member i from seed ``seed + i`` (member 0
    keeps the given initialisation and the run's seed, so it is the baseline model itself; the others are
    re-initialised), and deploy the average of their softmax outputs. The ensemble is one ``nn.Module``, so the
    defense stage's adaptive attacks run on it whole (gradients through the average), next to the transferred
    examples crafted on the baseline (= member 0)."""

    def __init__(self, *, members: int = 3):
        self.members = check_range(self, "members", members, low=2, high=16, integer=True)

    def architecture(self, model: nn.Module) -> nn.Module:
        return AveragedEnsemble([copy.deepcopy(model) for _ in range(self.members)])

    def fit(self, model: nn.Module, data: Dataset, *, recipe: TrainRecipe, seed: int,
            device: str | torch.device = "cpu", val: Dataset | None = None) -> nn.Module:
        ensemble = self.architecture(model)
        self.reports_ = []
        for i, member in enumerate(ensemble.members):
            if i:
                reinitialise(member, seed + i)
            report = train_model(member, data, recipe=recipe, seed=seed + i, val=val, device=device,
                                 description=f"ensemble member {i + 1}/{self.members}")
            self.reports_.append(report)
        return ensemble.eval()

    def facts(self) -> dict:
        return {"members": self.members}
