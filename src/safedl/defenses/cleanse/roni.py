"""Reject On Negative Impact (Nelson et al., "Exploiting Machine Learning to Subvert Your Spam Filter", LEET 2008;
Barreno et al., "The security of machine learning", 2010), batched.

RONI measures each candidate's effect on a trusted validation set: a model trained with the candidate is compared
with one trained without it, and candidates whose inclusion lowers trusted accuracy are rejected. Testing one sample
at a time costs a training per sample, so candidates are tested in groups: the data are cut into ``n_groups`` random
groups; a base model is trained on the trusted calibration half and, for each group, a copy is fine-tuned on that
group (``epochs`` passes); the group's impact is the change of accuracy on the trusted evaluation half relative to the
median over all groups (so the shared effect of fine-tuning cancels). Groups with impact below ``-threshold`` are
split in two and tested again, ``depth`` times (group testing), and the rejected leaves are flagged.

Group testing only pays off when poison is concentrated in few groups: given ``sources`` (contributors or ingestion
batches) each source is a group (per-source RONI), which is where RONI works. Measured on diffuse poison
(bench/measure_poisoning_defenses.py --part labels, mnist5k seed 0, label_flipping fully_random 10%): every random
group carries about the same share of flipped labels, so the impacts are noise: AUROC 0.49, tpr 0.037 at fpr 0.051
(n = 350 / 3150). Use data_cleaning or influence_functions against label noise.
"""
from __future__ import annotations

from typing import ClassVar

import copy
import logging

import torch
from torch import nn

from safedl.data.dataset import Dataset
from safedl.defenses.cleanse._common import TrainFn
from safedl.defenses.cleanse.result import DetectionResult
from safedl.errors import ConfigError
from safedl.models.train import TrainRecipe, accuracy, train_model
from safedl.registry import register
from safedl.utils.tensors import model_device, seed_everything
from safedl.utils.validate import check_positive, check_range

log = logging.getLogger(__name__)


def _reset(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return model


@register("cleanser", "roni")
class RONI:
    """Batched Reject On Negative Impact with a trusted validation set (group testing with recursive splits)."""

    inputs: ClassVar[frozenset[str]] = frozenset({"model", "trusted"})
    trusted_data: ClassVar[str] = "required"
    trusted_role: ClassVar[str] = "calibration and evaluation sets of the removal test"
    known_weak: ClassVar[dict[str, str]] = {
        "any": "RONI removes one random group at a time; diffuse poison is at chance (mnist5k 10% patch backdoor, "
               "seed 0: AUROC 0.529; 10% random label flips: AUROC 0.489; bench/measure_poisoning_defenses.py)",
    }

    def __init__(self, *, n_groups: int = 20, depth: int = 2, threshold: float = 0.01, epochs: int = 3,
                 base_epochs: int = 10, lr: float = 1e-3, seed: int = 0):
        self.n_groups = check_range(self, "n_groups", n_groups, low=2, integer=True)
        self.depth = check_range(self, "depth", depth, low=0, high=8, integer=True)
        self.threshold = check_range(self, "threshold", threshold, low=0.0, high=1.0)
        self.epochs = check_range(self, "epochs", epochs, low=1, integer=True)
        self.base_epochs = check_range(self, "base_epochs", base_epochs, low=1, integer=True)
        self.lr = check_positive(self, "lr", lr)
        self.seed = check_range(self, "seed", seed, low=0, integer=True)

    def find_poison(self, data: Dataset, *, model: nn.Module | None = None, trusted: Dataset | None = None,
                    train_fn: TrainFn | None = None, device: str | torch.device = "cpu",
                    sources: torch.Tensor | None = None) -> DetectionResult:
        """``model`` gives the architecture (its weights are re-initialised); ``trusted`` is required. ``sources``
        (int N, e.g. contributors or ingestion batches): test each source as a group instead of ``n_groups`` random
        groups (per-source RONI, where RONI is meant to work: poison concentrated in a source)."""
        if trusted is None or len(trusted) < 20:
            raise ConfigError("roni: needs a trusted clean set of at least 20 samples (trusted=...)")
        if model is None:
            raise ConfigError("roni: needs a model whose architecture it retrains (model=...)")
        g = seed_everything(self.seed)
        perm = torch.randperm(len(trusted), generator=g)
        calib, evalset = trusted.subset(perm[: len(perm) // 2]), trusted.subset(perm[len(perm) // 2 :])
        dev = model_device(model)
        base = _reset(copy.deepcopy(model)).to(dev)
        recipe = TrainRecipe(epochs=self.base_epochs, lr=self.lr, batch_size=32, schedule="constant", augment="none")
        train_model(base, calib, recipe=recipe, seed=self.seed, device=dev, description="roni base")
        tune = TrainRecipe(epochs=self.epochs, lr=self.lr, batch_size=32, schedule="constant", augment="none")

        def impact_of(idx: torch.Tensor) -> float:
            m = copy.deepcopy(base)
            # calibration samples are mixed in so the fine-tuned model does not just forget the other classes
            part = Dataset(torch.cat([data.x[idx], calib.x]), torch.cat([data.y[idx], calib.y]), data.num_classes)
            train_model(m, part, recipe=tune, seed=self.seed, device=dev, description="roni group")
            return accuracy(m, evalset, device=dev)

        if sources is not None:
            sources = torch.as_tensor(sources).long().cpu()
            groups = [torch.nonzero(sources == s).flatten() for s in torch.unique(sources)]
        else:
            groups = list(torch.tensor_split(torch.randperm(len(data), generator=g), self.n_groups))
        score = torch.zeros(len(data))
        flag = torch.zeros(len(data), dtype=torch.bool)
        tested = 0
        rounds = []
        ref_acc = float("nan")
        for level in range(self.depth + 1):
            accs = torch.tensor([impact_of(gi) for gi in groups])
            tested += len(groups)
            if level == 0:  # the typical group's accuracy is the reference for every later level
                ref_acc = float(accs.median())
            impact = accs - ref_acc
            for gi, imp in zip(groups, impact.tolist()):
                score[gi] = -imp
            bad = [gi for gi, imp in zip(groups, impact.tolist()) if imp < -self.threshold]
            rounds.append({"level": level, "groups": len(groups), "rejected": len(bad),
                           "group_size": int(sum(len(b) for b in groups) / max(1, len(groups)))})
            if level == self.depth or not bad:
                for gi in bad:
                    flag[gi] = True
                break
            groups = [half for gi in bad for half in torch.tensor_split(gi, 2) if len(half)]
        return DetectionResult(flag, score, {"reference_accuracy": ref_acc, "rounds": rounds, "trainings": tested})
