"""Label flipping (Biggio, Nelson & Laskov, "Poisoning Attacks against Support Vector Machines", ICML 2012 use it as
the baseline poisoning attack; Xiao et al. 2012 "Adversarial Label Flips"): relabel a share of the training set,
images untouched. Strategies: ``fully_random`` (any sample to a random other class), ``many_to_one`` (every source
class to one target class), ``one_to_one`` (one source class to one target class)."""
from __future__ import annotations

from typing import Sequence

import torch

from safedl.attacks.backdoor.base import check_class, select_indices
from safedl.data.dataset import Dataset, PoisonedDataset
from safedl.errors import ConfigError
from safedl.registry import register
from safedl.utils.validate import check_choice, check_fraction, check_range

STRATEGIES = ("fully_random", "many_to_one", "one_to_one")


@register("poisoning", "label_flipping")
class LabelFlipping:
    """Flip the labels of ``flip_rate`` of the eligible training samples.

    ``fully_random``: ``flip_rate`` of the whole training set, each to a uniformly drawn other class.
    ``many_to_one``: ``flip_rate`` of each source class (``source_classes``, default every class but the target)
    relabelled ``target_class``. ``one_to_one``: ``flip_rate`` of ``source_classes`` (exactly one class) relabelled
    ``target_class``. ``info["flip_map"]`` records source -> target; ``info["flip_counts"]`` the actual flips
    (original x new class counts).
    """

    def __init__(self, *, strategy: str = "many_to_one", flip_rate: float = 0.2, target_class: int | None = 0,
                 source_classes: int | Sequence[int] | None = None):
        self.strategy = check_choice(self, "strategy", strategy, STRATEGIES)
        self.flip_rate = float(check_fraction(self, "flip_rate", flip_rate, allow_zero=False))
        if isinstance(source_classes, int) and not isinstance(source_classes, bool):
            source_classes = [source_classes]
        if source_classes is not None:
            if isinstance(source_classes, (str, bytes)) or not isinstance(source_classes, Sequence):
                raise ConfigError(f"label_flipping: source_classes={source_classes!r} must be a class index or a list")
            source_classes = [check_range(self, "source_classes", c, low=0, integer=True) for c in source_classes]
            if len(set(source_classes)) != len(source_classes):
                raise ConfigError(f"label_flipping: source_classes={source_classes!r} repeats a class")
        if strategy == "fully_random":
            if source_classes is not None:
                raise ConfigError("label_flipping: strategy 'fully_random' takes no source_classes")
            target_class = None
        else:
            if target_class is None:
                raise ConfigError(f"label_flipping: strategy {strategy!r} needs target_class")
            check_range(self, "target_class", target_class, low=0, integer=True)
            if source_classes is not None and target_class in source_classes:
                raise ConfigError(f"label_flipping: target_class={target_class} is also in source_classes")
        if strategy == "one_to_one" and (source_classes is None or len(source_classes) != 1):
            raise ConfigError(f"label_flipping: strategy 'one_to_one' needs exactly one source class, "
                              f"got source_classes={source_classes!r}")
        self.target_class = target_class
        self.source_classes = source_classes

    def flip_map(self, num_classes: int) -> dict[int, int] | None:
        """Source class -> target class (None for fully_random)."""
        if self.strategy == "fully_random":
            return None
        sources = self.source_classes if self.source_classes is not None else \
            [c for c in range(num_classes) if c != self.target_class]
        return {int(s): int(self.target_class) for s in sources}  # type: ignore[arg-type]

    def poison(self, train: Dataset, *, generator: torch.Generator) -> PoisonedDataset:
        k = train.num_classes
        y = train.y.clone()
        if self.strategy == "fully_random":
            n_flip = int(round(self.flip_rate * len(train)))
            idx = select_indices(candidates=torch.ones(len(train), dtype=torch.bool), k=n_flip,
                                 generator=generator)
            # an offset in 1..k-1 always lands on another class, uniformly
            offset = torch.randint(1, k, (len(idx),), generator=generator)
            y[idx] = (train.y[idx] + offset) % k
            fmap = None
        else:
            check_class(self, "target_class", self.target_class, k)  # type: ignore[arg-type]
            fmap = self.flip_map(k)
            assert fmap is not None
            chosen = []
            for src, tgt in fmap.items():  # per class, so every source class loses the same share
                check_class(self, "source_classes", src, k)
                cand = train.y == src
                n_flip = int(round(self.flip_rate * int(cand.sum())))
                chosen.append(select_indices(candidates=cand, k=n_flip, generator=generator))
            idx = torch.cat(chosen).sort().values if chosen else torch.zeros(0, dtype=torch.long)
            y[idx] = int(self.target_class)  # type: ignore[arg-type]
        counts = torch.zeros(k, k, dtype=torch.long)
        counts.index_put_((train.y[idx], y[idx]), torch.ones(len(idx), dtype=torch.long), accumulate=True)
        info = {"attack": "label_flipping", "strategy": self.strategy, "flip_rate": self.flip_rate,
                "target_class": self.target_class, "flip_map": fmap, "flip_counts": counts.tolist(),
                "selected_indices": idx}
        if fmap is None:
            info.pop("flip_map")
        return PoisonedDataset.from_clean(train, x=train.x.clone(), y=y, info=info,
                                          name=f"{train.name}+label_flipping")

    def params(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and not k.endswith("_")}

    def __repr__(self) -> str:
        return f"LabelFlipping({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"
