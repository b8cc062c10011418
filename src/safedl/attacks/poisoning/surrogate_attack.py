"""Base of clean-label poisoning attacks that optimise their poisons against the attacker's surrogate model
(feature collision, the label-consistent backdoor): label checks, ``fit`` and the shared ``info`` entries."""
from __future__ import annotations

import torch
from torch import nn

from safedl.attacks.backdoor.base import check_class
from safedl.attacks.poisoning.surrogate import train_surrogate
from safedl.data.dataset import Dataset
from safedl.utils.validate import check_range


class SurrogatePoisoning:
    """Clean-label poisoning against a surrogate: labels are never changed; poisons are drawn from ``target_class``.

    ``fit(train, *, surrogate=None, victims=None, victim_labels=None)`` stores the surrogate (trained on the clean
    ``train`` when None) and, for attacks that aim at fixed test instances, the victims.
    """

    needs_victims = False

    def _init_common(self, *, target_class: int, seed: int) -> None:
        self.target_class = check_range(self, "target_class", target_class, low=0, integer=True)
        self.seed = check_range(self, "seed", seed, low=0, integer=True)
        self.surrogate_: nn.Module | None = None
        self.victims_: torch.Tensor | None = None
        self.victim_labels_: torch.Tensor | None = None

    def fit(self, train: Dataset, *, surrogate: nn.Module | None = None, victims: torch.Tensor | None = None,
            victim_labels: torch.Tensor | None = None, device: torch.device | str | None = None
            ) -> "SurrogatePoisoning":
        """Take the attacker's surrogate (trained on clean data; trained on ``train`` here when None) and the victim
        test instances (N x C x H x W, none of the target class) for attacks that need them."""
        check_class(self, "target_class", self.target_class, train.num_classes)
        self.surrogate_ = surrogate if surrogate is not None else train_surrogate(train, seed=self.seed,
                                                                                  device=device or "cpu")
        if victims is not None:
            name = self.registry_name  # type: ignore[attr-defined]
            if victims.ndim != 4 or tuple(victims.shape[1:]) != train.shape:
                raise ValueError(f"{name}: victims must be N x {' x '.join(map(str, train.shape))}")
            if victim_labels is not None and bool((victim_labels == self.target_class).any()):
                raise ValueError(f"{name}: a victim of the target class cannot be misclassified into it")
            limit = getattr(self, "n_victims", len(victims))
            self.victims_ = victims.detach().cpu()[:limit]
            self.victim_labels_ = None if victim_labels is None else victim_labels.detach().cpu()[:limit]
        return self

    def params(self) -> dict:
        """The validated config (public attributes not ending in '_')."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and not k.endswith("_")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"
