"""Influence of each training sample on the loss of a trusted clean set, by TracIn (Pruthi, Liu, Kale & Sundararajan,
"Estimating Training Data Influence by Tracing Gradient Descent", NeurIPS 2020), on the last layer only.

The registry name is historical: this is not Koh & Liang's influence functions ("Understanding Black-box
Predictions via Influence Functions", ICML 2017; inverse-Hessian-vector products at the final parameters), and it
traces only the last (linear) layer's gradients, not the whole network's.

TracInCP(z, z') = sum over checkpoints t of eta_t * grad L(w_t, z) . grad L(w_t, z'). Summing over the trusted set
gives each training sample's influence on the trusted loss: positive = its gradient steps lowered that loss
(proponent), negative = they raised it (harmful). As in the paper's practical variant, gradients are taken for the
last (linear) layer, where per-sample gradients have the closed form (softmax - onehot) x [h, 1], so the sum over the
trusted set collapses to one C x (D+1) matrix per checkpoint and the whole computation is a few matrix products.

Checkpoints come from ``checkpoints`` (state dicts), or from retraining with ``train_fn(data, on_epoch_end=...)``
(one per epoch), or else the given model alone (one checkpoint). Step sizes are taken equal across checkpoints.
Each trusted gradient is normalised to unit length before summing (so the direction of the trusted loss, not a few
badly fit trusted samples, decides). The score is the harm (-influence) standardised by median/MAD; samples above ``z_threshold`` are flagged, or the
``flag_fraction`` most harmful if that is set.

Measured (bench/measure_poisoning_defenses.py --part labels, mnist5k seed 0, label_flipping fully_random 10%, the
8 epoch checkpoints of a baseline-recipe run, trusted = the 500 validation images): AUROC 0.912; at the default
z > 3.5, tpr 0.677 [0.626, 0.724] (n=350) at fpr 0.003 (n=3150), precision 0.960. Against the 10% patch backdoor
(``--part backdoor --scenarios 0.1 --defenses influence_functions``) the poison ranks above most clean samples
(AUROC 0.895) but no poisoned sample reaches z > 3.5 (tpr 0.000, n=350): a dirty-label backdoor barely moves the
loss on clean data, so use spectral signatures or activation clustering against backdoors. At 1% poison the same
backdoor stands out more: AUROC 0.988, tpr 0.686 [0.520, 0.814] (n=35) at fpr 0.012, ASR after retraining 0.559.
"""
from __future__ import annotations

from typing import ClassVar

import copy

import torch
import torch.nn.functional as F
from torch import nn

from safedl.utils.stats import robust_z
from safedl.data.dataset import Dataset
from safedl.defenses.cleanse._common import TrainFn
from safedl.defenses.cleanse.result import DetectionResult
from safedl.errors import ConfigError
from safedl.models.features import HEAD_INPUT, extract_features, last_linear
from safedl.registry import register
from safedl.utils.validate import check_positive, check_range


def _last_layer_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample last-layer gradient factors: r = softmax - onehot (N x C) and h1 = [h, 1] (N x (D+1))."""
    h = extract_features(model, x, layer=HEAD_INPUT).float()  # the last linear layer's input, whatever feature_layer says
    lin = last_linear(model)
    with torch.no_grad():
        logits = h @ lin.weight.detach().cpu().T + (lin.bias.detach().cpu() if lin.bias is not None else 0.0)
    r = logits.softmax(1) - F.one_hot(y, num_classes).float()
    return r, torch.cat([h, torch.ones(len(h), 1)], 1)


def tracin_influence(states: list[nn.Module], data: Dataset, trusted: Dataset) -> torch.Tensor:
    """sum_t sum_j grad_i(w_t) . grad_j(w_t) for every training sample i over trusted samples j."""
    total = torch.zeros(len(data))
    for m in states:
        r_t, h_t = _last_layer_grads(m, trusted.x, trusted.y, data.num_classes)
        # unit-normalised trusted gradients, so a few badly fit trusted samples do not dominate the sum
        scale = (r_t.norm(dim=1) * h_t.norm(dim=1)).clamp_min(1e-12)
        g_sum = (r_t / scale[:, None]).T @ h_t  # C x (D+1): the summed trusted-set gradient of the last layer
        r, h = _last_layer_grads(m, data.x, data.y, data.num_classes)
        total += ((r @ g_sum) * h).sum(1)  # <r_i h_i^T, G> = r_i^T G h_i
    return total


@register("cleanser", "influence_functions")
class InfluenceFunctions:
    """TracIn influence (Pruthi et al. 2020) of each training sample on a trusted set's loss; flags the most harmful."""

    model_needs: tuple[str, ...] = ("head",)  # what the model must offer (safedl.models.features.model_problems)
    inputs: ClassVar[frozenset[str]] = frozenset({"model", "trusted", "train_fn"})
    trusted_data: ClassVar[str] = "required"
    trusted_role: ClassVar[str] = "the loss whose influence is traced"
    known_weak: ClassVar[dict[str, str]] = {}

    def __init__(self, *, z_threshold: float = 3.5, flag_fraction: float | None = None, max_checkpoints: int = 8):
        self.z_threshold = check_positive(self, "z_threshold", z_threshold)
        if flag_fraction is not None:
            check_range(self, "flag_fraction", flag_fraction, low=0.0, high=1.0, low_inclusive=False)
        self.flag_fraction = flag_fraction
        self.max_checkpoints = check_range(self, "max_checkpoints", max_checkpoints, low=1, integer=True)

    def find_poison(self, data: Dataset, *, model: nn.Module | None = None, trusted: Dataset | None = None,
                    train_fn: TrainFn | None = None, device: str | torch.device = "cpu",
                    checkpoints: list[dict] | None = None) -> DetectionResult:
        if trusted is None or len(trusted) == 0:
            raise ConfigError("influence_functions: needs a trusted clean set (trusted=...) to measure influence on")
        states: list[nn.Module] = []
        if checkpoints is not None:
            if model is None:
                raise ConfigError("influence_functions: checkpoints need a model of the same architecture (model=...)")
            for sd in checkpoints:
                m = copy.deepcopy(model)
                m.load_state_dict(sd)
                states.append(m.eval())
        elif train_fn is not None:
            snaps: list[nn.Module] = []

            def keep(epoch: int, m: nn.Module) -> None:
                snaps.append(copy.deepcopy(m).eval())

            train_fn(data, on_epoch_end=keep)
            states = snaps
        elif model is not None:
            states = [model]
        else:
            raise ConfigError("influence_functions: needs model=, checkpoints= or train_fn=")
        if len(states) > self.max_checkpoints:  # evenly spaced, always including the last
            step = len(states) / self.max_checkpoints
            states = [states[min(len(states) - 1, int(round((i + 1) * step)) - 1)] for i in range(self.max_checkpoints)]
        harm = -tracin_influence(states, data, trusted)
        z = robust_z(harm)
        if self.flag_fraction is not None:
            k = int(round(self.flag_fraction * len(data)))
            flag = torch.zeros(len(data), dtype=torch.bool)
            flag[torch.argsort(z, descending=True)[:k]] = True
        else:
            flag = z > self.z_threshold
        return DetectionResult(flag, z, {"method": "tracin_last_layer", "checkpoints": len(states),
                                         "z_threshold": self.z_threshold, "flag_fraction": self.flag_fraction})
