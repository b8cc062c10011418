"""Clean-label poisoning: labels are never changed; perturbed images of the right class go into the training set.

``method="feature_collision"``: Poison Frogs (Shafahi et al., "Poison Frogs! Targeted Clean-Label Poisoning Attacks
on Neural Networks", NeurIPS 2018). For each victim test instance t, base images b of the target class get an
opacity-``opacity`` watermark of t (b_w = opacity * t + (1 - opacity) * b) and are optimised by forward-backward
splitting towards p = argmin ||f(p) - f(t)||^2 + beta * ||p - b_w||^2 in the penultimate feature space f of a
surrogate trained on clean data, beta = beta0 * (feature dim / input dim)^2. Trained on, they pull t to the target.

``method="clean_label_backdoor"``: Turner, Tsipras & Madry, "Label-Consistent Backdoor Attacks" (2019). A
``class_fraction`` of the target-class training images is perturbed by untargeted L-inf PGD (radius ``eps``)
against a surrogate trained on clean data, so their natural features become hard to learn, then stamped with a
trigger; only the trigger explains their (correct) label, and the model learns trigger -> target.

Both need a surrogate: ``fit(train, *, surrogate=None, victims=None, victim_labels=None)`` stores it (or trains one
on the clean ``train`` when None) and, for feature collision, the victim instances. ``poison`` fits itself with a
trained surrogate when not fitted (feature collision then takes victims from held-out training images of the
source class, which it leaves unchanged).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from safedl.attacks.backdoor.base import check_class, select_indices
from safedl.attacks.backdoor.static_patch import StaticPatch
from safedl.attacks.evasion.pgd import PGD
from safedl.attacks.poisoning.surrogate import feature_fn, train_surrogate
from safedl.data.dataset import Dataset, PoisonedDataset
from safedl.errors import ConfigError
from safedl.registry import register
from safedl.utils.tensors import eval_mode, frozen_params, model_device
from safedl.utils.validate import check_choice, check_fraction, check_positive, check_range

log = logging.getLogger(__name__)

METHODS = ("feature_collision", "clean_label_backdoor")


@register("poisoning", "clean_label")
class CleanLabel:
    """Clean-label poisoning by feature collision (Poison Frogs) or the label-consistent backdoor (Turner et al.).

    Shared: ``target_class`` (the class the attack steers inputs to; poisons are drawn from it), ``seed``.
    clean_label_backdoor: ``class_fraction`` of the target class poisoned, ``eps`` (L-inf PGD radius), ``steps``,
    and the trigger (``trigger``, ``patch_size``, ``position``, ``trigger_alpha``; see static_patch);
    ``all_corners`` stamps it at the four corners (Turner et al.); ``eot_shift`` > 0 averages the PGD loss over
    ``eot_samples`` random translations of up to that many pixels, anticipating shift augmentation.
    feature_collision: ``source_class`` (victims' class; None: any other class), ``n_victims``,
    ``poisons_per_victim``, ``opacity`` (watermark), ``beta0``, ``fc_steps``.
    """

    def __init__(self, *, method: str = "clean_label_backdoor", target_class: int = 0,
                 class_fraction: float = 0.5, eps: float = 0.3, steps: int = 20,
                 trigger: str = "pattern", patch_size: int = 3, position: str = "bottom_right",
                 trigger_alpha: float = 1.0, source_class: int | None = None, n_victims: int = 10,
                 poisons_per_victim: int = 20, opacity: float = 0.3, beta0: float = 0.25, fc_steps: int = 200,
                 all_corners: bool = True, eot_shift: int = 0, eot_samples: int = 4, seed: int = 0):
        self.method = check_choice(self, "method", method, METHODS)
        self.target_class = check_range(self, "target_class", target_class, low=0, integer=True)
        self.class_fraction = float(check_fraction(self, "class_fraction", class_fraction, allow_zero=False))
        self.eps = float(check_range(self, "eps", eps, low=0.0, high=1.0))
        self.steps = check_positive(self, "steps", steps, integer=True)
        self.source_class = None if source_class is None else check_range(self, "source_class", source_class, low=0,
                                                                           integer=True)
        if self.source_class is not None and self.source_class == target_class:
            raise ConfigError(f"clean_label: source_class={source_class} equals target_class")
        self.n_victims = check_positive(self, "n_victims", n_victims, integer=True)
        self.poisons_per_victim = check_positive(self, "poisons_per_victim", poisons_per_victim, integer=True)
        self.opacity = float(check_fraction(self, "opacity", opacity, allow_zero=True, allow_one=False))
        self.beta0 = float(check_positive(self, "beta0", beta0, allow_zero=True))
        self.fc_steps = check_positive(self, "fc_steps", fc_steps, integer=True)
        self.seed = check_range(self, "seed", seed, low=0, integer=True)
        if not isinstance(all_corners, bool):
            raise ConfigError(f"clean_label: all_corners={all_corners!r} must be true or false")
        self.all_corners = all_corners
        self.eot_shift = check_range(self, "eot_shift", eot_shift, low=0, high=8, integer=True)
        self.eot_samples = check_positive(self, "eot_samples", eot_samples, integer=True)
        # the trigger is a static patch (validated by StaticPatch itself); Turner et al. stamp all four corners so
        # it survives the flips and crops of data augmentation
        positions = ("top_left", "top_right", "bottom_left", "bottom_right") if all_corners else (position,)
        self.stamps = [StaticPatch(target_class=target_class, trigger=trigger, patch_size=patch_size, position=pos,
                                   blend_alpha=trigger_alpha, label_mode="clean", seed=seed) for pos in positions]
        self.surrogate_: nn.Module | None = None
        self.victims_: torch.Tensor | None = None
        self.victim_labels_: torch.Tensor | None = None

    # -- the handler asks these to pick victims for feature collision -----------------------------------------
    @property
    def needs_victims(self) -> bool:
        return self.method == "feature_collision"

    def victim_mask(self, y: torch.Tensor) -> torch.Tensor:
        """Which labelled inputs may serve as victims: the source class (any other class when None)."""
        return (y == self.source_class) if self.source_class is not None else (y != self.target_class)

    def fit(self, train: Dataset, *, surrogate: nn.Module | None = None, victims: torch.Tensor | None = None,
            victim_labels: torch.Tensor | None = None, device: torch.device | str | None = None) -> "CleanLabel":
        """Take the attacker's surrogate (trained on clean data; trained on ``train`` here when None) and, for
        feature collision, the victim test instances (N x C x H x W, none of the target class)."""
        check_class(self, "target_class", self.target_class, train.num_classes)
        self.surrogate_ = surrogate if surrogate is not None else train_surrogate(train, seed=self.seed,
                                                                                  device=device or "cpu")
        if victims is not None:
            if victims.ndim != 4 or tuple(victims.shape[1:]) != train.shape:
                raise ValueError(f"clean_label: victims must be N x {' x '.join(map(str, train.shape))}")
            if victim_labels is not None and bool((victim_labels == self.target_class).any()):
                raise ValueError("clean_label: a victim of the target class cannot be misclassified into it")
            self.victims_ = victims.detach().cpu()[: self.n_victims]
            self.victim_labels_ = None if victim_labels is None else victim_labels.detach().cpu()[: self.n_victims]
        return self

    def apply_trigger(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """The clean-label backdoor's trigger on test-time inputs (feature collision has no trigger)."""
        if self.method != "clean_label_backdoor":
            raise RuntimeError("clean_label: feature_collision has no trigger; its victims are fixed test instances")
        for st in self.stamps:
            x = st.apply_trigger(x, generator=generator)
        return x

    def trigger(self, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.method != "clean_label_backdoor":
            raise RuntimeError("clean_label: feature_collision has no trigger")
        return self.stamps[0].trigger(shape)

    def poison(self, train: Dataset, *, generator: torch.Generator) -> PoisonedDataset:
        check_class(self, "target_class", self.target_class, train.num_classes)
        if self.source_class is not None:
            check_class(self, "source_class", self.source_class, train.num_classes)
        holdout = None
        if self.surrogate_ is None or (self.needs_victims and self.victims_ is None):
            if self.needs_victims and self.victims_ is None:
                # no test-time victims given: hold out source-class training images (left unchanged) as victims
                pool = torch.nonzero(self.victim_mask(train.y)).flatten()
                holdout = pool[torch.randperm(len(pool), generator=generator)[: self.n_victims]].sort().values
                keep = torch.ones(len(train), dtype=torch.bool)
                keep[holdout] = False
                self.fit(train.subset(keep), surrogate=self.surrogate_, victims=train.x[holdout],
                         victim_labels=train.y[holdout])
            else:
                self.fit(train, surrogate=self.surrogate_)
        if self.method == "clean_label_backdoor":
            return self._label_consistent_backdoor(train, generator)
        return self._feature_collision(train, generator, holdout)

    def _label_consistent_backdoor(self, train: Dataset, generator: torch.Generator) -> PoisonedDataset:
        in_target = train.y == self.target_class
        k = int(round(self.class_fraction * int(in_target.sum())))
        idx = select_indices(candidates=in_target, k=k, generator=generator)
        model = self.surrogate_
        assert model is not None
        dev = model_device(model)
        pgd = PGD(eps=self.eps, norm="linf", steps=self.steps, seed=self.seed) if self.eps > 0 else None
        x = train.x.clone()
        for i in range(0, len(idx), 256):
            b = idx[i : i + 256]
            xb = train.x[b].to(dev)
            if self.eot_shift > 0 and self.eps > 0:
                xb = self._pgd_eot(model, xb, train.y[b].to(dev), generator)
            elif pgd is not None:  # untargeted: away from the (true) target class, making its features hard to learn
                xb = pgd(model, xb, train.y[b].to(dev))
            x[b] = xb.cpu()
        x[idx] = self.apply_trigger(x[idx], generator=generator)
        info = {"attack": "clean_label", "method": self.method, "target_class": self.target_class,
                "selected_indices": idx, "class_fraction": self.class_fraction,
                "linf_budget": f"eps={self.eps:g} (L-inf PGD, {self.steps} steps"
                + (f", EOT over shifts of up to {self.eot_shift} px" if self.eot_shift else "")
                + ", before the trigger is stamped)",
                "trigger": {"pattern": self.stamps[0].trigger(train.shape)[0],
                            "mask": self.stamps[0].trigger(train.shape)[1],
                            "position": [st.position for st in self.stamps]}}
        return PoisonedDataset.from_clean(train, x=x, y=train.y.clone(), info=info, name=f"{train.name}+clean_label")

    def _pgd_eot(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
                 ) -> torch.Tensor:
        """Untargeted L-inf PGD whose loss is averaged over random translations of up to ``eot_shift`` pixels
        (expectation over transformation, Athalye et al. 2018), so the hardness survives shift augmentation."""
        from safedl.attacks.evasion._lp import pgd_steps
        from safedl.models.train import random_shift

        alpha = 2.5 * self.eps / self.steps
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        delta = ((torch.rand(x.shape, generator=g) * 2 - 1) * self.eps).to(x.device)
        delta = (x + delta).clamp(0, 1) - x
        yy = y.repeat(self.eot_samples)
        def eot_loss(xa: torch.Tensor) -> torch.Tensor:
            xs = torch.cat([random_shift(xa, self.eot_shift, g) for _ in range(self.eot_samples)])
            return torch.nn.functional.cross_entropy(model(xs), yy, reduction="sum")

        with eval_mode(model), frozen_params(model):
            delta = pgd_steps(x, delta, eot_loss, steps=self.steps, alpha=alpha, norm="linf", eps=self.eps)
        return (x + delta).detach()

    def _feature_collision(self, train: Dataset, generator: torch.Generator, holdout: torch.Tensor | None
                           ) -> PoisonedDataset:
        victims = self.victims_
        assert victims is not None and self.surrogate_ is not None
        model = self.surrogate_
        dev = model_device(model)
        in_target = train.y == self.target_class
        nv = len(victims)
        per = min(self.poisons_per_victim, int(in_target.sum()) // max(1, nv))
        if per == 0:
            raise ConfigError(f"clean_label: class {self.target_class} has too few samples for {nv} victims")
        idx = select_indices(candidates=in_target, k=per * nv, generator=generator)
        # shuffle before assigning bases to victims so each victim gets a random set of bases
        idx = idx[torch.randperm(len(idx), generator=generator)]
        owner = torch.arange(nv).repeat_interleave(per)
        base = train.x[idx].to(dev)
        t = victims.to(dev)[owner]
        base_w = (self.opacity * t + (1 - self.opacity) * base).clamp(0, 1)
        feats = feature_fn(model)
        with eval_mode(model), frozen_params(model):
            with torch.no_grad():
                ft = feats(t)
            d_in, d_f = base[0].numel(), ft.shape[1]
            beta = self.beta0 * (d_f / d_in) ** 2
            p = base_w.clone()
            lr = None

            def objective(z: torch.Tensor) -> torch.Tensor:
                return (feats(z) - ft).pow(2).sum(1) + beta * (z - base_w).flatten(1).pow(2).sum(1)

            with torch.no_grad():
                obj = objective(p)
            for _ in range(self.fc_steps):
                z = p.clone().requires_grad_(True)
                loss = (feats(z) - ft).pow(2).sum(1)
                (g,) = torch.autograd.grad(loss.sum(), z)
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
        x = train.x.clone()
        x[idx] = p.detach().cpu()
        info = {"attack": "clean_label", "method": self.method, "target_class": self.target_class,
                "selected_indices": idx.sort().values, "poison_indices": idx, "poison_owner": owner,
                "victims": victims,
                "victim_labels": self.victim_labels_ if self.victim_labels_ is not None else
                torch.full((nv,), -1, dtype=torch.long),
                "opacity": f"{self.opacity:g} watermark of the victim in each base image", "beta": beta,
                "objective_mean": float(obj.mean()), "victims_from_train": holdout}
        return PoisonedDataset.from_clean(train, x=x, y=train.y.clone(), info=info, name=f"{train.name}+clean_label")

    def params(self) -> dict:
        out = {k: v for k, v in vars(self).items() if not k.startswith("_") and not k.endswith("_") and k != "stamps"}
        st = self.stamps[0]
        out.update(trigger=st.trigger_type, patch_size=st.patch_size, position=st.position,
                   trigger_alpha=st.blend_alpha)
        return out

    def __repr__(self) -> str:
        return f"CleanLabel({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"
