"""The label-consistent backdoor: Turner, Tsipras & Madry, "Label-Consistent Backdoor Attacks" (2019).

A ``class_fraction`` of the target-class training images is perturbed by untargeted L-inf PGD (radius ``eps``)
against a surrogate trained on clean data, so their natural features become hard to learn, then stamped with a
trigger; only the trigger explains their (correct) label, and the model learns trigger -> target.
"""
from __future__ import annotations

import torch
from torch import nn

from safedl.attacks.backdoor.base import check_class, select_indices
from safedl.attacks.backdoor.static_patch import StaticPatch
from safedl.attacks.evasion._lp import pgd_steps
from safedl.attacks.evasion.pgd import PGD
from safedl.attacks.poisoning.surrogate_attack import SurrogatePoisoning
from safedl.data.dataset import Dataset, PoisonedDataset
from safedl.errors import ConfigError
from safedl.models.train import random_shift
from safedl.registry import register
from safedl.utils.tensors import eval_mode, frozen_params, model_device
from safedl.utils.validate import check_fraction, check_positive, check_range

CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


@register("poisoning", "label_consistent_backdoor")
class LabelConsistentBackdoor(SurrogatePoisoning):
    """Label-consistent backdoor (Turner et al. 2019): PGD-hardened target-class images stamped with a trigger.

    ``class_fraction`` of the target class is poisoned, ``eps`` is the L-inf PGD radius (0: no PGD), ``steps`` its
    iterations; the trigger is ``trigger``, ``patch_size``, ``position`` and ``trigger_alpha`` (see static_patch);
    ``all_corners`` stamps it at the four corners, as Turner et al. do, so it survives flips and crops;
    ``eot_shift`` > 0 averages the PGD loss over ``eot_samples`` random translations of up to that many pixels.
    """

    def __init__(self, *, target_class: int = 0, class_fraction: float = 0.5, eps: float = 0.3, steps: int = 20,
                 trigger: str = "pattern", patch_size: int = 3, position: str = "bottom_right",
                 trigger_alpha: float = 1.0, all_corners: bool = True, eot_shift: int = 0, eot_samples: int = 4,
                 seed: int = 0):
        self._init_common(target_class=target_class, seed=seed)
        self.class_fraction = float(check_fraction(self, "class_fraction", class_fraction, allow_zero=False))
        self.eps = float(check_range(self, "eps", eps, low=0.0, high=1.0))
        self.steps = check_positive(self, "steps", steps, integer=True)
        if not isinstance(all_corners, bool):
            raise ConfigError(f"label_consistent_backdoor: all_corners={all_corners!r} must be true or false")
        self.all_corners = all_corners
        self.eot_shift = check_range(self, "eot_shift", eot_shift, low=0, high=8, integer=True)
        self.eot_samples = check_positive(self, "eot_samples", eot_samples, integer=True)
        self.trigger, self.patch_size, self.position, self.trigger_alpha = trigger, patch_size, position, trigger_alpha
        self._stamps = [StaticPatch(target_class=target_class, trigger=trigger, patch_size=patch_size, position=pos,
                                    blend_alpha=trigger_alpha, label_mode="clean", seed=seed)
                        for pos in (CORNERS if all_corners else (position,))]  # StaticPatch validates the trigger

    def apply_trigger(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Stamp the trigger (at every stamp position) into test-time inputs."""
        for st in self._stamps:
            x = st.apply_trigger(x, generator=generator)
        return x

    def trigger_pattern(self, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The trigger pattern and mask stamped into images of ``shape`` (C, H, W)."""
        return self._stamps[0].trigger_pattern(shape)

    def poison(self, train: Dataset, *, generator: torch.Generator) -> PoisonedDataset:
        check_class(self, "target_class", self.target_class, train.num_classes)
        if self.surrogate_ is None:
            self.fit(train)
        model = self.surrogate_
        assert model is not None
        in_target = train.y == self.target_class
        idx = select_indices(candidates=in_target, k=int(round(self.class_fraction * int(in_target.sum()))),
                             generator=generator)
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
        pattern, mask = self.trigger_pattern(train.shape)
        info = {"attack": self.registry_name, "target_class": self.target_class,  # type: ignore[attr-defined]
                "selected_indices": idx, "class_fraction": self.class_fraction,
                "linf_budget": f"eps={self.eps:g} (L-inf PGD, {self.steps} steps"
                + (f", EOT over shifts of up to {self.eot_shift} px" if self.eot_shift else "")
                + ", before the trigger is stamped)",
                "trigger": {"pattern": pattern, "mask": mask, "position": [st.position for st in self._stamps]}}
        return PoisonedDataset.from_clean(train, x=x, y=train.y.clone(), info=info,
                                          name=f"{train.name}+label_consistent_backdoor")

    def _pgd_eot(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
                 ) -> torch.Tensor:
        """Untargeted L-inf PGD whose loss is averaged over random translations of up to ``eot_shift`` pixels
        (expectation over transformation, Athalye et al. 2018), so the hardness survives shift augmentation."""
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
