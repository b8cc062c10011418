"""ART's backdoor poisoning (``art:PoisoningAttackBackdoor``, the BadNets-style attack of Gu et al. 2017 as ART
implements it) as a safedl backdoor: ART's ``PoisoningAttackBackdoor`` with one of ART's perturbation functions
(``add_pattern_bd``, ``add_single_bd``, ``insert_image``) named in the profile, dirty-label, all-to-one.

safedl chooses the poisoned samples (a seeded ``poison_fraction`` of the non-target training images), ART stamps
them and relabels them to ``target_class``; the result carries the exact ground truth (``is_poison``, original
images and labels) and ``apply_trigger`` stamps test inputs with the same ART perturbation.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

import numpy as np
import torch

from safedl.attacks.backdoor.base import check_class, select_indices
from safedl.data.dataset import Dataset, PoisonedDataset
from safedl.errors import ConfigError
from safedl.integrations.art.estimator import numpy_seed
from safedl.integrations.art.loader import import_art
from safedl.utils.validate import check_choice, check_fraction, check_range

PERTURBATIONS = ("add_pattern_bd", "add_single_bd", "insert_image")
#: the perturbation arguments safedl sets itself (the image layout)
FIXED_ARGS = ("x", "channels_first")


class ArtPoisoningAttackBackdoor:
    """ART's PoisoningAttackBackdoor with an ART perturbation function, dirty-label and all-to-one.

    ``perturbation`` names ART's function (``add_pattern_bd``: a checkerboard near the bottom-right corner,
    ``add_single_bd``: one pixel, ``insert_image``: a picture from ``perturbation_params.backdoor_path``);
    ``perturbation_params`` are that function's keyword arguments (e.g. ``distance``, ``pixel_value``).
    ``poison_fraction`` is a share of the whole training set, drawn from the non-target classes.
    """

    label_mode = "dirty"
    mapping = "all_to_one"

    def __init__(self, *, perturbation: str = "add_pattern_bd", perturbation_params: dict[str, Any] | None = None,
                 target_class: int = 0, poison_fraction: float = 0.1, seed: int = 0):
        self.perturbation = check_choice(self, "perturbation", perturbation, PERTURBATIONS)
        self.perturbation_params = dict(perturbation_params or {})
        self.target_class = check_range(self, "target_class", target_class, low=0, integer=True)
        self.poison_fraction = float(check_fraction(self, "poison_fraction", poison_fraction))
        self.seed = check_range(self, "seed", seed, low=0, integer=True)
        fn = getattr(import_art("art.attacks.poisoning.perturbations"), self.perturbation)
        allowed = [p for p in inspect.signature(fn).parameters if p not in FIXED_ARGS]
        unknown = sorted(set(self.perturbation_params) - set(allowed))
        if unknown:
            raise ConfigError(f"backdoor {self.registry_name!r}: perturbation_params {unknown} are not arguments of "
                              f"ART's {self.perturbation}; allowed: {', '.join(allowed)}")
        self._fn = functools.partial(fn, **self.perturbation_params)
        self.apply_trigger(torch.zeros(1, 1, 8, 8))  # ART checks its arguments when it runs

    def art_attack(self, *, channels_first: bool = False) -> Any:
        """ART's PoisoningAttackBackdoor with this perturbation (images channels-first when ``channels_first``)."""
        fn = functools.partial(self._fn, channels_first=True) if channels_first else self._fn
        return import_art("art.attacks.poisoning").PoisoningAttackBackdoor(fn)

    def apply_trigger(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Stamp ART's perturbation into a batch N x C x H x W in [0, 1] (ART works channels-last)."""
        if x.ndim != 4:
            raise ValueError(f"{self.registry_name}: x must be N x C x H x W, got shape {tuple(x.shape)}")
        if len(x) == 0:
            return x.clone()
        nhwc = x.detach().cpu().permute(0, 2, 3, 1).numpy().copy()
        attack = self.art_attack()
        try:
            with numpy_seed(self.seed + 1):
                out, _ = attack.poison(nhwc, y=np.zeros(len(x), dtype=np.int64))
        except (ValueError, TypeError, IndexError, OSError) as exc:
            raise ConfigError(f"backdoor {self.registry_name!r}: ART's {self.perturbation} failed on "
                              f"{tuple(x.shape[1:])} images with {self.perturbation_params!r}: {exc}") from None
        out = torch.as_tensor(np.asarray(out, dtype=np.float32)).reshape(nhwc.shape).permute(0, 3, 1, 2)
        if float(out.min()) < 0 or float(out.max()) > 1:
            raise ConfigError(f"backdoor {self.registry_name!r}: the trigger leaves the [0, 1] pixel range "
                              f"({self.perturbation_params!r}); set pixel_value in [0, 1]")
        return out.to(dtype=x.dtype, device=x.device).contiguous()

    def backdoor_labels(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Every triggered input is aimed at ``target_class`` (all-to-one)."""
        return torch.full_like(y, self.target_class)

    def poison(self, train: Dataset, *, generator: torch.Generator) -> PoisonedDataset:
        """Stamp and relabel a seeded ``poison_fraction`` of the non-target training images."""
        check_class(self, "target_class", self.target_class, train.num_classes)
        k = int(round(self.poison_fraction * len(train)))
        idx = select_indices(candidates=train.y != self.target_class, k=k, generator=generator)
        x, y = train.x.clone(), train.y.clone()
        x[idx] = self.apply_trigger(train.x[idx])
        y[idx] = self.target_class
        info = {"attack": self.registry_name, "label_mode": "dirty", "mapping": "all_to_one",
                "target_class": self.target_class, "selected_indices": idx, "requested": k, "selected": len(idx),
                "perturbation": f"ART {self.perturbation}({self.perturbation_params})"}
        return PoisonedDataset.from_clean(train, x=x, y=y, info=info, name=f"{train.name}+{self.registry_name}")

    def params(self) -> dict:
        """The validated config."""
        return {k: getattr(self, k) for k in ("perturbation", "perturbation_params", "target_class",
                                              "poison_fraction", "seed")}
