"""Shared machinery of trigger backdoors: poison-sample selection, stamping, ground truth and ``apply_trigger``.

Subclasses say what the trigger is (``_trigger(shape) -> (pattern, mask)``, patch-sized) and store validated
config; this base turns that into ``poison(train, *, generator)`` and ``apply_trigger(x)``.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from safedl.attacks.backdoor import triggers
from safedl.data.dataset import Dataset, PoisonedDataset
from safedl.errors import ConfigError
from safedl.utils.validate import check_choice, check_fraction, check_range

log = logging.getLogger(__name__)

LABEL_MODES = ("dirty", "clean")
MAPPINGS = ("all_to_one", "all_to_all")


def check_class(owner: Any, key: str, value: int, num_classes: int) -> int:
    """A class index valid for data with ``num_classes`` classes (checked when the data are known)."""
    if not 0 <= value < num_classes:
        raise ConfigError(f"{getattr(owner, 'registry_name', owner)}: {key}={value!r} is not a class of this data set "
                          f"(classes are 0..{num_classes - 1})")
    return value


def select_indices(*, candidates: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` indices drawn uniformly without replacement from the True entries of ``candidates``, sorted."""
    pool = torch.nonzero(candidates, as_tuple=False).flatten()
    k = min(int(k), len(pool))
    pick = pool[torch.randperm(len(pool), generator=generator)[:k]]
    return pick.sort().values


class BackdoorAttack:
    """Base of trigger backdoors: dirty-label (relabel to the target) or clean-label (stamp target-class samples)."""

    target_class: int
    poison_fraction: float
    label_mode: str
    blend_alpha: float
    position: str
    margin: int
    seed: int
    mapping: str = "all_to_one"

    def _init_common(self, *, target_class: int, poison_fraction: float, label_mode: str, blend_alpha: float,
                     position: str, margin: int, seed: int, mapping: str = "all_to_one") -> None:
        self.target_class = check_range(self, "target_class", target_class, low=0, integer=True)
        self.poison_fraction = float(check_fraction(self, "poison_fraction", poison_fraction))
        self.label_mode = check_choice(self, "label_mode", label_mode, LABEL_MODES)
        self.blend_alpha = float(check_fraction(self, "blend_alpha", blend_alpha))
        self.position = check_choice(self, "position", position, triggers.POSITIONS)
        self.margin = check_range(self, "margin", margin, low=0, integer=True)
        self.seed = check_range(self, "seed", seed, low=0, integer=True)
        self.mapping = check_choice(self, "mapping", mapping, MAPPINGS)
        if self.mapping == "all_to_all" and self.label_mode != "dirty":
            raise ConfigError(f"{getattr(self, 'registry_name', 'backdoor')}: mapping='all_to_all' relabels every "
                              "poison c -> c+1 and needs label_mode='dirty'")

    # -- what subclasses provide -------------------------------------------------------------------------------
    def _trigger(self, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pattern (C x h x w) and mask (1 x h x w) for images of ``shape`` (C, H, W)."""
        raise NotImplementedError

    # -- public API --------------------------------------------------------------------------------------------
    def trigger_pattern(self, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The trigger pattern and mask this attack stamps into images of ``shape`` (C, H, W)."""
        return self._trigger(tuple(shape))  # type: ignore[arg-type]

    def apply_trigger(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Stamp the trigger into a batch (test-time inputs). Random positions use ``generator`` (default: seeded)."""
        if x.ndim != 4:
            raise ValueError(f"{self.registry_name}: x must be N x C x H x W, got shape {tuple(x.shape)}")
        if generator is None:
            generator = torch.Generator().manual_seed(self.seed + 1)
        pattern, mask = self.trigger_pattern(tuple(x.shape[1:]))
        rows, cols = triggers.offsets(self.position, len(x), image_hw=(x.shape[2], x.shape[3]),
                                      patch_hw=tuple(mask.shape[1:]), margin=self.margin, generator=generator,
                                      who=self.registry_name)
        return triggers.stamp(x, pattern, mask, rows, cols, alpha=self.blend_alpha)

    def backdoor_labels(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The label the backdoor maps each true label to: ``target_class`` (all-to-one) or ``(y + 1) mod C``
        (all-to-all, Gu et al. 2017 Sec. 4)."""
        if self.mapping == "all_to_all":
            return (y + 1) % num_classes
        return torch.full_like(y, self.target_class)

    def poison(self, train: Dataset, *, generator: torch.Generator) -> PoisonedDataset:
        """Stamp the trigger into a ``poison_fraction`` of the training set (dirty: non-target samples, relabelled
        to the target; clean: target-class samples only, labels kept). The mask marks exactly the changed samples."""
        check_class(self, "target_class", self.target_class, train.num_classes)
        n = len(train)
        k_req = int(round(self.poison_fraction * n))
        if self.mapping == "all_to_all":
            candidates = torch.ones_like(train.y, dtype=torch.bool)
        elif self.label_mode == "dirty":
            candidates = train.y != self.target_class
        else:
            candidates = train.y == self.target_class
        if k_req > int(candidates.sum()):
            log.warning("%s: %d poisons requested but only %d %s samples exist; poisoning all of them",
                        self.registry_name, k_req, int(candidates.sum()),
                        "non-target" if self.label_mode == "dirty" else "target-class")
        idx = select_indices(candidates=candidates, k=k_req, generator=generator)
        pattern, mask = self.trigger_pattern(train.shape)
        rows, cols = triggers.offsets(self.position, len(idx), image_hw=train.shape[1:], patch_hw=tuple(mask.shape[1:]),
                                      margin=self.margin, generator=generator, who=self.registry_name)
        x = train.x.clone()
        y = train.y.clone()
        x[idx] = triggers.stamp(train.x[idx], pattern, mask, rows, cols, alpha=self.blend_alpha)
        if self.label_mode == "dirty":
            y[idx] = self.backdoor_labels(train.y[idx], train.num_classes)
        info = {
            "attack": self.registry_name, "label_mode": self.label_mode, "mapping": self.mapping,
            "target_class": self.target_class if self.mapping == "all_to_one" else None,
            "selected_indices": idx, "requested": k_req, "selected": len(idx),
            "trigger": {"pattern": pattern, "mask": mask, "position": self.position, "blend_alpha": self.blend_alpha,
                        "rows": rows, "cols": cols},
        }
        return PoisonedDataset.from_clean(train, x=x, y=y, info=info, name=f"{train.name}+{self.registry_name}")

    def params(self) -> dict:
        """The validated config (public attributes not ending in '_')."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and not k.endswith("_")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"
