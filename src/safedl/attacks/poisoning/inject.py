"""Poisoning by injection: outside images added to the training set under a label the attacker chooses (the
"data injection" attacker of Biggio & Roli, "Wild Patterns", Pattern Recognition 2018, Sec. 4: the attacker can add
samples but not touch existing ones; e.g. 25 photos of one object labelled as another class).

The attack's effect is measured on held-out images of the same outside set (never trained on): how many the
poisoned model puts in ``target_class``. With ``source_class`` (the data set's class the outside images really
depict) that rate is a targeted misclassification rate and the injected rows carry it as their original label.
"""
from __future__ import annotations

from pathlib import Path

import torch

from safedl.attacks.backdoor.base import check_class
from safedl.data.dataset import Dataset, PoisonedDataset
from safedl.data.loaders import RESIZE_POLICIES, load_images
from safedl.errors import ConfigError, DataError
from safedl.registry import register
from safedl.utils.validate import check_choice, check_fraction, check_positive, check_range


@register("poisoning", "inject")
class Inject:
    """Inject outside images (``path``: a folder of images or an ``.npz`` with an array ``x``) labelled
    ``target_class`` into the training split.

    ``n`` images are injected (None: every image not held out); ``holdout_fraction`` of the outside images (drawn
    with the run's seed) are kept out of training and measure the attack at test time. Folder images are converted
    to the training images' size and channels (``resize``: stretch | center_crop | letterbox); ``.npz`` images must
    already match; a relative ``path`` is read from the working directory. ``source_class``: the data set's class the images depict (None: none of them).
    """

    def __init__(self, *, path: str, target_class: int, n: int | None = None, holdout_fraction: float = 0.2,
                 source_class: int | None = None, resize: str = "stretch"):
        if not isinstance(path, str) or not path:
            raise ConfigError(f"inject: path={path!r} must be a folder of images or an .npz file")
        self.path = path
        self.target_class = check_range(self, "target_class", target_class, low=0, integer=True)
        self.n = None if n is None else check_positive(self, "n", n, integer=True)
        self.holdout_fraction = float(check_fraction(self, "holdout_fraction", holdout_fraction, allow_zero=True,
                                                     allow_one=False))
        self.source_class = None if source_class is None else check_range(self, "source_class", source_class, low=0,
                                                                           integer=True)
        if self.source_class is not None and self.source_class == self.target_class:
            raise ConfigError(f"inject: source_class={source_class} equals target_class (nothing would be mislabelled)")
        self.resize = check_choice(self, "resize", resize, RESIZE_POLICIES)
        self.check_path()  # a missing folder is a profile error (exit 2), found at validation

    def check_path(self) -> Path:
        """The outside images' path, or ConfigError naming it and what is allowed."""
        p = Path(self.path).expanduser()
        if p.is_dir() or (p.is_file() and p.suffix.lower() in (".npz", ".npy")):
            return p
        raise ConfigError(f"inject: path={self.path!r} is not a folder of images or an .npz/.npy file")

    def load(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """The outside images as C x H x W = ``shape`` tensors in [0, 1]."""
        c, h, w = shape
        p = self.check_path()
        x = load_images(p, size=(h, w), channels=c if c in (1, 3) else None, resize=self.resize)
        if tuple(x.shape[1:]) != tuple(shape):
            raise DataError(f"inject: {p}: images of shape {tuple(x.shape[1:])} (C x H x W), the training images are "
                            f"{tuple(shape)}; store them at that size or use a folder of image files")
        return x

    def split(self, m: int, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of the outside images to inject and to hold out (both sorted)."""
        n_hold = int(round(self.holdout_fraction * m))
        n_inj = m - n_hold if self.n is None else self.n
        if n_inj > m - n_hold or n_inj < 1:
            raise DataError(f"inject: {self.path}: {m} images, {n_hold} held out (holdout_fraction "
                            f"{self.holdout_fraction:g}), so n={self.n} cannot be injected")
        perm = torch.randperm(m, generator=generator)
        return perm[:n_inj].sort().values, perm[m - n_hold:].sort().values

    def poison(self, train: Dataset, *, generator: torch.Generator) -> PoisonedDataset:
        k = train.num_classes
        check_class(self, "target_class", self.target_class, k)
        if self.source_class is not None:
            check_class(self, "source_class", self.source_class, k)
        outside = self.load(train.shape)
        inj, hold = self.split(len(outside), generator=generator)
        xi = outside[inj]
        m = len(xi)
        true = self.source_class if self.source_class is not None else self.target_class
        x = torch.cat([train.x, xi])
        y = torch.cat([train.y, torch.full((m,), self.target_class, dtype=torch.long)])
        is_poison = torch.cat([torch.zeros(len(train), dtype=torch.bool), torch.ones(m, dtype=torch.bool)])
        victims = outside[hold] if len(hold) else xi
        info = {"attack": "inject", "target_class": self.target_class, "source_class": self.source_class,
                "injected": m, "held_out": len(hold), "path": str(self.path),
                "selected_indices": torch.arange(len(train), len(train) + m),
                "victims": victims, "victim_labels": torch.full((len(victims),), -1 if self.source_class is None
                                                                else self.source_class, dtype=torch.long),
                "victims_are": "held-out outside images" if len(hold) else "the injected images themselves"}
        return PoisonedDataset(x, y, k, f"{train.name}+inject", train.class_names, is_poison=is_poison,
                               original_x=x.clone(), original_y=torch.cat([train.y, torch.full((m,), true)]),
                               info=info)

    def params(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and not k.endswith("_")}

    def __repr__(self) -> str:
        return f"Inject({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"
