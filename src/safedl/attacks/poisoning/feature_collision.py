"""Feature-collision poisoning: Shafahi et al., "Poison Frogs! Targeted Clean-Label Poisoning Attacks on Neural
Networks" (NeurIPS 2018).

For each victim test instance t, base images b of the target class get an opacity-``opacity`` watermark of t
(b_w = opacity * t + (1 - opacity) * b) and are optimised by forward-backward splitting towards
p = argmin ||f(p) - f(t)||^2 + beta * ||p - b_w||^2 in the penultimate feature space f of a surrogate trained on
clean data, beta = beta0 * (feature dim / input dim)^2. Trained on, they pull t to the target class.
"""
from __future__ import annotations

import torch
from torch import nn

from safedl.attacks.backdoor.base import check_class, select_indices
from safedl.attacks.poisoning.surrogate import feature_fn
from safedl.attacks.poisoning.surrogate_attack import SurrogatePoisoning
from safedl.data.dataset import Dataset, PoisonedDataset
from safedl.errors import ConfigError
from safedl.registry import register
from safedl.utils.tensors import eval_mode, frozen_params, model_device
from safedl.utils.validate import check_fraction, check_positive, check_range


@register("poisoning", "feature_collision")
class FeatureCollision(SurrogatePoisoning):
    """Poison Frogs feature collision (Shafahi et al. 2018): target-class images that collide with victims in
    feature space.

    ``source_class``: the victims' class (None: any other class); ``n_victims`` victims, ``poisons_per_victim``
    bases each, ``opacity`` of the victim watermark, ``beta0`` and ``fc_steps`` of the optimisation. Without victims
    given to ``fit``, ``poison`` holds out source-class training images as victims and leaves them unchanged.
    """

    needs_victims = True

    def __init__(self, *, target_class: int = 0, source_class: int | None = None, n_victims: int = 10,
                 poisons_per_victim: int = 20, opacity: float = 0.3, beta0: float = 0.25, fc_steps: int = 200,
                 seed: int = 0):
        self._init_common(target_class=target_class, seed=seed)
        self.source_class = None if source_class is None else check_range(self, "source_class", source_class, low=0,
                                                                           integer=True)
        if self.source_class is not None and self.source_class == target_class:
            raise ConfigError(f"feature_collision: source_class={source_class} equals target_class")
        self.n_victims = check_positive(self, "n_victims", n_victims, integer=True)
        self.poisons_per_victim = check_positive(self, "poisons_per_victim", poisons_per_victim, integer=True)
        self.opacity = float(check_fraction(self, "opacity", opacity, allow_zero=True, allow_one=False))
        self.beta0 = float(check_positive(self, "beta0", beta0, allow_zero=True))
        self.fc_steps = check_positive(self, "fc_steps", fc_steps, integer=True)

    def victim_mask(self, y: torch.Tensor) -> torch.Tensor:
        """Which labelled inputs may serve as victims: the source class (any other class when None)."""
        return (y == self.source_class) if self.source_class is not None else (y != self.target_class)

    def poison(self, train: Dataset, *, generator: torch.Generator) -> PoisonedDataset:
        check_class(self, "target_class", self.target_class, train.num_classes)
        if self.source_class is not None:
            check_class(self, "source_class", self.source_class, train.num_classes)
        holdout = None
        if self.victims_ is None:  # no test-time victims: hold out source-class training images, left unchanged
            pool = torch.nonzero(self.victim_mask(train.y)).flatten()
            holdout = pool[torch.randperm(len(pool), generator=generator)[: self.n_victims]].sort().values
            keep = torch.ones(len(train), dtype=torch.bool)
            keep[holdout] = False
            self.fit(train.subset(keep), surrogate=self.surrogate_, victims=train.x[holdout],
                     victim_labels=train.y[holdout])
        elif self.surrogate_ is None:
            self.fit(train, victims=self.victims_, victim_labels=self.victim_labels_)
        victims, model = self.victims_, self.surrogate_
        assert victims is not None and model is not None
        nv = len(victims)
        in_target = train.y == self.target_class
        per = min(self.poisons_per_victim, int(in_target.sum()) // max(1, nv))
        if per == 0:
            raise ConfigError(f"feature_collision: class {self.target_class} has too few samples for {nv} victims")
        idx = select_indices(candidates=in_target, k=per * nv, generator=generator)
        # shuffle before assigning bases to victims so each victim gets a random set of bases
        idx = idx[torch.randperm(len(idx), generator=generator)]
        owner = torch.arange(nv).repeat_interleave(per)
        p, beta, objective = self._collide(model, train.x[idx], victims[owner])
        x = train.x.clone()
        x[idx] = p.cpu()
        info = {"attack": self.registry_name, "target_class": self.target_class,  # type: ignore[attr-defined]
                "selected_indices": idx.sort().values, "poison_indices": idx, "poison_owner": owner,
                "victims": victims,
                "victim_labels": self.victim_labels_ if self.victim_labels_ is not None else
                torch.full((nv,), -1, dtype=torch.long),
                "opacity": f"{self.opacity:g} watermark of the victim in each base image", "beta": beta,
                "objective_mean": objective, "victims_from_train": holdout}
        return PoisonedDataset.from_clean(train, x=x, y=train.y.clone(), info=info,
                                          name=f"{train.name}+feature_collision")

    def _collide(self, model: nn.Module, base: torch.Tensor, victims: torch.Tensor
                 ) -> tuple[torch.Tensor, float, float]:
        """Forward-backward splitting from the watermarked bases; returns the poisons, beta and the mean objective."""
        dev = model_device(model)
        base, t = base.to(dev), victims.to(dev)
        base_w = (self.opacity * t + (1 - self.opacity) * base).clamp(0, 1)
        feats = feature_fn(model)
        with eval_mode(model), frozen_params(model):
            with torch.no_grad():
                ft = feats(t)
            beta = self.beta0 * (ft.shape[1] / base[0].numel()) ** 2

            def objective(z: torch.Tensor) -> torch.Tensor:
                return (feats(z) - ft).pow(2).sum(1) + beta * (z - base_w).flatten(1).pow(2).sum(1)

            p, lr = base_w.clone(), None
            with torch.no_grad():
                obj = objective(p)
            for _ in range(self.fc_steps):
                z = p.clone().requires_grad_(True)
                (g,) = torch.autograd.grad((feats(z) - ft).pow(2).sum(), z)
                if lr is None:  # per-sample step: the first step moves the largest pixel by 0.05
                    lr = 0.05 / g.flatten(1).abs().amax(1).clamp_min(1e-12)
                lr_ = lr.view(-1, 1, 1, 1)
                fwd = p - lr_ * g  # forward (gradient) step on the feature term
                cand = ((fwd + lr_ * beta * base_w) / (1 + lr_ * beta)).clamp(0, 1)  # backward (proximal) step
                with torch.no_grad():
                    new_obj = objective(cand)
                better = new_obj <= obj
                p = torch.where(better.view(-1, 1, 1, 1), cand, p)
                obj = torch.where(better, new_obj, obj)
                lr = torch.where(better, lr, lr * 0.5)  # backtrack where the objective went up
        return p.detach(), beta, float(obj.mean())
