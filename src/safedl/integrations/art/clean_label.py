"""ART's clean-label backdoor (``art:PoisoningAttackCleanLabelBackdoor``: Turner, Tsipras & Madry,
"Label-Consistent Backdoor Attacks", 2019, as ART implements it) as a safedl backdoor.

ART draws ``pp_poison`` of the target-class training images (with replacement, from numpy's RNG, seeded by safedl),
makes them hard to learn by untargeted PGD (``eps``, ``eps_step``, ``max_iter``, ``num_random_init``) on a proxy
classifier, then stamps ART's trigger (``perturbation``, as ``art:PoisoningAttackBackdoor``) and keeps their
correct labels. The proxy is the attacker's surrogate the poisoning stage hands to ``fit`` (trained on the clean
training set). The ground truth is exact: a poisoned image is one whose pixels ART changed.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from safedl import registry
from safedl.attacks.backdoor.base import check_class
from safedl.attacks.poisoning.surrogate_attack import SurrogatePoisoning
from safedl.data.dataset import Dataset, PoisonedDataset
from safedl.errors import ConfigError
from safedl.integrations.art.backdoor import ArtPoisoningAttackBackdoor
from safedl.integrations.art.estimator import art_classifier, numpy_seed
from safedl.integrations.art.loader import import_art
from safedl.utils.tensors import eval_mode, frozen_params, model_device
from safedl.utils.validate import check_fraction, check_positive, check_range


class ArtPoisoningAttackCleanLabelBackdoor(SurrogatePoisoning):
    """ART's PoisoningAttackCleanLabelBackdoor: PGD-hardened target-class images stamped with ART's trigger, labels
    unchanged. ART's parameters: ``pp_poison`` (share of the target class), ``eps`` / ``eps_step`` / ``max_iter`` /
    ``num_random_init`` (its L-inf PGD); safedl's: ``target_class``, the trigger (``perturbation``,
    ``perturbation_params``) and ``seed`` (numpy's RNG, which ART draws from)."""

    label_mode = "clean"
    mapping = "all_to_one"

    def __init__(self, *, target_class: int = 0, pp_poison: float = 0.33, eps: float = 0.3, eps_step: float = 0.1,
                 max_iter: int = 100, num_random_init: int = 0, perturbation: str = "add_pattern_bd",
                 perturbation_params: dict[str, Any] | None = None, seed: int = 0):
        self._init_common(target_class=target_class, seed=seed)
        self.pp_poison = float(check_fraction(self, "pp_poison", pp_poison, allow_zero=False, allow_one=False))
        self.eps = float(check_range(self, "eps", eps, low=0.0, high=1.0))
        self.eps_step = float(check_positive(self, "eps_step", eps_step))
        self.max_iter = check_positive(self, "max_iter", max_iter, integer=True)
        self.num_random_init = check_range(self, "num_random_init", num_random_init, low=0, integer=True)
        self.perturbation = perturbation
        self.perturbation_params = dict(perturbation_params or {})
        # ART's trigger, validated by the art:PoisoningAttackBackdoor adapter (its errors name its parameters)
        self._trigger: ArtPoisoningAttackBackdoor = registry.create(
            "backdoor", "art:PoisoningAttackBackdoor", perturbation=perturbation,
            perturbation_params=self.perturbation_params, target_class=target_class, seed=seed)

    def apply_trigger(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Stamp ART's trigger into test-time inputs."""
        return self._trigger.apply_trigger(x, generator=generator)

    def backdoor_labels(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Every triggered input is aimed at ``target_class`` (all-to-one)."""
        return torch.full_like(y, self.target_class)

    def _art_attack(self, shape: tuple[int, ...], num_classes: int) -> Any:
        model = self.surrogate_
        assert model is not None
        proxy = art_classifier(model, input_shape=shape, nb_classes=num_classes, device=model_device(model))
        target = np.eye(num_classes, dtype=np.float32)[self.target_class]
        try:
            return import_art("art.attacks.poisoning").PoisoningAttackCleanLabelBackdoor(
                backdoor=self._trigger.art_attack(channels_first=True), proxy_classifier=proxy, target=target,
                pp_poison=self.pp_poison, norm=np.inf, eps=self.eps, eps_step=self.eps_step, max_iter=self.max_iter,
                num_random_init=self.num_random_init)
        except ValueError as exc:
            raise ConfigError(f"backdoor {self.registry_name!r}: ART refused the parameters: {exc}") from None

    def poison(self, train: Dataset, *, generator: torch.Generator) -> PoisonedDataset:
        """Run ART's poison on the whole training set (one-hot labels) with numpy seeded from ``seed``."""
        check_class(self, "target_class", self.target_class, train.num_classes)
        if self.surrogate_ is None:
            self.fit(train)
        attack = self._art_attack(tuple(train.shape), train.num_classes)
        x_np = train.x.numpy().astype(np.float32)
        y_np = np.eye(train.num_classes, dtype=np.float32)[train.y.numpy()]
        model = self.surrogate_
        assert model is not None
        with numpy_seed(self.seed), eval_mode(model), frozen_params(model):
            out, _ = attack.poison(x_np, y=y_np)
        x = torch.as_tensor(np.asarray(out, dtype=np.float32)).reshape(train.x.shape).clamp(0, 1)
        idx = torch.nonzero((x != train.x).flatten(1).any(1)).flatten()
        requested = int(self.pp_poison * int((train.y == self.target_class).sum()))
        info = {"attack": self.registry_name, "target_class": self.target_class, "selected_indices": idx,  # type: ignore[attr-defined]
                "label_mode": "clean", "mapping": "all_to_one", "requested": requested, "selected": len(idx),
                "linf_budget": f"eps={self.eps:g} (ART's L-inf PGD, {self.max_iter} steps of {self.eps_step:g}, "
                               "before the trigger is stamped)",
                "perturbation": f"ART {self.perturbation}({self.perturbation_params})"}
        return PoisonedDataset.from_clean(train, x=x, y=train.y.clone(), info=info,
                                          name=f"{train.name}+{self.registry_name}")  # type: ignore[attr-defined]

    def params(self) -> dict:
        """The validated config."""
        return {k: getattr(self, k) for k in ("target_class", "pp_poison", "eps", "eps_step", "max_iter",
                                              "num_random_init", "perturbation", "perturbation_params", "seed")}
