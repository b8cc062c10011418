"""Verified accuracy by interval bound propagation (Gowal et al. 2018, arXiv:1810.12715): an input counts as
verified at L-inf radius eps when the IBP lower bound of z_y - z_j is positive for every other class j, so no point
of the eps-ball (inside [0, 1]) changes the label. Sound but incomplete: an unverified input may still be robust."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from safedl.data.dataset import Dataset
from safedl.defenses.certify.interval_bounds import layers, verified
from safedl.defenses.train.ibp import IBPTraining
from safedl.models.train import TrainRecipe
from safedl.registry import register
from safedl.utils.tensors import eval_mode, model_device, predict
from safedl.utils.validate import check_positive, check_range

#: L-inf radii at which certified_accuracy reports by default
EPS_GRID = (0.01, 0.03, 0.05, 0.1, 0.2)


@register("certifier", "ibp")
class IBPCertifier:
    """IBP verification of a model at L-inf ``eps`` (and any radii asked of ``certified_accuracy``).

    ``fit`` trains the model with ``trainer:ibp`` at the same ``eps`` (``train_eps_factor`` times it, Gowal et al.
    train at 1.1 x the test eps); ``with_model`` adopts a trained one. The deployed decision is the model's own
    label (``predict`` never abstains); the certificate is what ``certify`` and ``certified_accuracy`` report.
    Models with layers IBP cannot bound are refused with the layer's path and type. A profile names it
    ``certifier:ibp`` (``ibp`` alone is ``trainer:ibp``).
    """

    randomized = False  # the deployed decision is the model's deterministic label: attacked white-box directly
    norm = "linf"

    def __init__(self, *, eps: float = 0.1, train_eps_factor: float = 1.1, batch_size: int = 512):
        self.eps = float(check_range(self, "eps", eps, low=0, high=1, low_inclusive=False))
        self.train_eps_factor = float(check_range(self, "train_eps_factor", train_eps_factor, low=1.0, high=2.0))
        self.batch_size = check_positive(self, "batch_size", batch_size, integer=True)
        self.model_: nn.Module | None = None

    def params(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and not k.endswith("_")}

    def fit(self, model: nn.Module, data: Dataset, *, recipe: TrainRecipe, seed: int, device: torch.device | str = "cpu",
            val: Dataset | None = None) -> nn.Module:
        """Train ``model`` with IBP at ``train_eps_factor * eps`` and keep it as ``model_``."""
        trainer = IBPTraining(eps=min(1.0, self.train_eps_factor * self.eps))
        return self.with_model(trainer.fit(model, data, recipe=recipe, seed=seed, device=device, val=val)).model_

    def with_model(self, model: nn.Module) -> "IBPCertifier":
        """Use an already trained model (refused when a layer cannot be bounded)."""
        layers(model)
        self.model_ = model.eval()
        return self

    def _model(self) -> nn.Module:
        if self.model_ is None:
            raise RuntimeError("ibp: call fit() or with_model() first")
        return self.model_

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return predict(self._model(), x, batch_size=self.batch_size)

    def predict_with_shares(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's labels and softmax probabilities (no abstention)."""
        model = self._model()
        with eval_mode(model), torch.no_grad():
            p = torch.cat([model(x[i:i + self.batch_size].to(model_device(model))).softmax(1)
                           for i in range(0, len(x), self.batch_size)])
        return p.argmax(1), p

    @torch.no_grad()
    def certify(self, x: torch.Tensor, y: torch.Tensor, *, eps: float | None = None) -> torch.Tensor:
        """Bool N: ``y`` is the model's label on every point of the L-inf ball of radius ``eps`` (default: ``eps``)."""
        model = self._model()
        e = self.eps if eps is None else float(eps)
        dev = model_device(model)
        with eval_mode(model):
            return torch.cat([verified(model, x[i:i + self.batch_size].to(dev), y[i:i + self.batch_size].to(dev), e)
                              .cpu() for i in range(0, len(x), self.batch_size)])

    def certified_accuracy(self, x: torch.Tensor, y: torch.Tensor, radii: Sequence[float] = EPS_GRID
                           ) -> dict[float, tuple[int, int]]:
        """Per L-inf radius: (verified and correct count, n). Radius 0 is the clean accuracy."""
        out = {}
        for r in radii:
            ok = (self.predict(x).cpu() == y.cpu()) if r == 0 else self.certify(x, y, eps=r)
            out[float(r)] = (int(ok.sum()), len(x))
        return out
