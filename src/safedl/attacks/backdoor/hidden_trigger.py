"""Hidden-trigger backdoor: Saha, Subramanya & Pirsiavash, "Hidden Trigger Backdoor Attacks", AAAI 2020.

Poisons are correctly labelled target-class images b, optimised within an L-inf ball of radius ``eps`` around b so
that their penultimate features (of a surrogate trained on clean data) come close to those of source images with
the trigger patch pasted at random locations (Alg. 1: each step pairs every poison with its nearest triggered
source image in feature space and lowers ||f(z) - f(s~)||^2). The trigger never appears in the training data; at
test time the patch on a source image sends it to the target class. Steps are signed-gradient (PGD-style) steps
projected on the eps-ball (our variant of the paper's SGD with a decaying learning rate).
"""
from __future__ import annotations

import torch

from safedl.attacks.backdoor import triggers
from safedl.attacks.backdoor.base import check_class, select_indices
from safedl.attacks.poisoning.surrogate import feature_fn
from safedl.attacks.poisoning.surrogate_attack import SurrogatePoisoning
from safedl.data.dataset import Dataset, PoisonedDataset
from safedl.errors import ConfigError
from safedl.registry import register
from safedl.utils.tensors import eval_mode, frozen_params, model_device
from safedl.utils.validate import check_choice, check_positive, check_range


@register("backdoor", "hidden_trigger")
class HiddenTrigger(SurrogatePoisoning):
    """Hidden-trigger backdoor (Saha et al. 2020): ``n_poisons`` target-class images perturbed by at most ``eps``
    (L-inf) towards triggered ``source_class`` images in feature space; labels unchanged, trigger never shown.

    Trigger: a seeded random-noise patch of ``patch_size`` pixels at ``position`` (``random``: anywhere, as in the
    paper); ``steps`` optimisation steps of size ``step_size`` (None: eps / 10) over batches of ``source_batch``
    triggered source images. ``source_class`` None: every class but the target is a source. ``n_victims`` test
    images of the source class(es), triggered, measure the attack.
    """

    needs_victims = True

    def __init__(self, *, target_class: int = 0, source_class: int | None = 1, n_poisons: int = 50,
                 eps: float = 16 / 255, patch_size: int = 3, position: str = "random", steps: int = 200,
                 step_size: float | None = None, source_batch: int = 100, n_victims: int = 1000, seed: int = 0):
        self._init_common(target_class=target_class, seed=seed)
        self.source_class = None if source_class is None else check_range(self, "source_class", source_class, low=0,
                                                                           integer=True)
        if self.source_class is not None and self.source_class == target_class:
            raise ConfigError(f"hidden_trigger: source_class={source_class} equals target_class")
        self.n_poisons = check_positive(self, "n_poisons", n_poisons, integer=True)
        self.eps = float(check_range(self, "eps", eps, low=0, high=1, low_inclusive=False))
        self.patch_size = check_range(self, "patch_size", patch_size, low=1, high=64, integer=True)
        self.position = check_choice(self, "position", position, triggers.POSITIONS)
        self.steps = check_positive(self, "steps", steps, integer=True)
        self.step_size = None if step_size is None else float(check_positive(self, "step_size", step_size))
        self.source_batch = check_positive(self, "source_batch", source_batch, integer=True)
        self.n_victims = check_positive(self, "n_victims", n_victims, integer=True)
        self.blend_alpha = 1.0

    def victim_mask(self, y: torch.Tensor) -> torch.Tensor:
        """Which labelled inputs are sources: the source class (every other class when None)."""
        return (y == self.source_class) if self.source_class is not None else (y != self.target_class)

    def trigger_pattern(self, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The patch (C x p x p) and its mask (1 x p x p)."""
        c, h, w = shape
        if self.patch_size > min(h, w):
            raise ConfigError(f"hidden_trigger: patch_size={self.patch_size} does not fit in {h}x{w} images")
        return triggers.make_patch("random_noise", channels=c, size=(self.patch_size, self.patch_size),
                                   noise_seed=self.seed)

    def apply_trigger(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Paste the patch into a batch (random positions from ``generator``, default seeded)."""
        if x.ndim != 4:
            raise ValueError(f"hidden_trigger: x must be N x C x H x W, got shape {tuple(x.shape)}")
        g = generator if generator is not None else torch.Generator().manual_seed(self.seed + 1)
        pattern, mask = self.trigger_pattern(tuple(x.shape[1:]))
        rows, cols = triggers.offsets(self.position, len(x), image_hw=(x.shape[2], x.shape[3]),
                                      patch_hw=tuple(mask.shape[1:]), margin=0, generator=g, who="hidden_trigger")
        return triggers.stamp(x, pattern, mask, rows, cols)

    def poison(self, train: Dataset, *, generator: torch.Generator) -> PoisonedDataset:
        check_class(self, "target_class", self.target_class, train.num_classes)
        if self.source_class is not None:
            check_class(self, "source_class", self.source_class, train.num_classes)
        if self.surrogate_ is None:
            self.fit(train, victims=self.victims_, victim_labels=self.victim_labels_)
        idx = select_indices(candidates=train.y == self.target_class, k=self.n_poisons, generator=generator)
        sources = train.x[self.victim_mask(train.y)]
        if len(idx) == 0 or len(sources) == 0:
            raise ConfigError("hidden_trigger: the training set needs target-class and source-class images")
        z, before, after = self._optimise(train.x[idx], sources, generator)
        x = train.x.clone()
        x[idx] = z
        info = {"attack": "hidden_trigger", "target_class": self.target_class, "source_class": self.source_class,
                "selected_indices": idx, "label_mode": "clean",
                "linf_budget": f"{self.eps:.4g} (L-inf) around each poison's base image",
                "feature_distance_mean": {"before": before, "after": after}}
        if self.victims_ is not None:
            info["victims"] = self.apply_trigger(self.victims_)
            info["victim_labels"] = self.victim_labels_ if self.victim_labels_ is not None else \
                torch.full((len(self.victims_),), -1, dtype=torch.long)
        return PoisonedDataset.from_clean(train, x=x, y=train.y.clone(), info=info, name=f"{train.name}+hidden_trigger")

    def _optimise(self, base: torch.Tensor, sources: torch.Tensor, generator: torch.Generator
                  ) -> tuple[torch.Tensor, float, float]:
        """Alg. 1: per step, a fresh batch of triggered sources, nearest-neighbour pairing in feature space, one
        signed-gradient step on ||f(z) - f(s~)||^2, projection on the eps-ball and [0, 1]. Returns the poisons and
        the mean paired feature distance before and after."""
        model = self.surrogate_
        assert model is not None
        dev = model_device(model)
        feats = feature_fn(model)
        base = base.to(dev)
        z = base.clone()
        step = self.step_size if self.step_size is not None else self.eps / 10
        dist: list[float] = []
        with eval_mode(model), frozen_params(model):
            for _ in range(self.steps + 1):
                pick = torch.randint(0, len(sources), (self.source_batch,), generator=generator)
                src = self.apply_trigger(sources[pick], generator=generator).to(dev)
                with torch.no_grad():
                    fs = feats(src)
                zz = z.clone().requires_grad_(True)
                fz = feats(zz)
                pair = torch.cdist(fz.detach(), fs).argmin(1)  # nearest triggered source of each poison
                loss = (fz - fs[pair]).pow(2).sum(1)
                dist.append(float(loss.detach().sqrt().mean()))
                if len(dist) > self.steps:
                    break
                (g,) = torch.autograd.grad(loss.sum(), zz)
                z = (z - step * g.sign()).clamp(base - self.eps, base + self.eps).clamp(0, 1).detach()
        return z.cpu(), dist[0], dist[-1]
