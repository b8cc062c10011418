"""Learned-trigger backdoor (our variant): optimise a trigger pattern and mask against a surrogate trained on clean
data, then poison with it. The objective is the trigger-reverse-engineering formulation of Neural Cleanse (Wang et
al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks", S&P 2019) used offensively:
cross-entropy of the stamped inputs to the target class + L1 on the mask + total variation, with the mask confined
to a patch covering ``patch_size_ratio`` of the image.

It is not TrojanNN (Liu et al., "Trojaning Attack on Neural Networks", NDSS 2018), which picks internal neurons of
the model under attack, generates a trigger that maximally excites them, and retrains that model on
reverse-engineered data; here the trigger is fitted to a surrogate's target-class decision and delivered by data
poisoning only."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from safedl.attacks.backdoor import triggers
from safedl.attacks.backdoor.base import BackdoorAttack, check_class
from safedl.attacks.poisoning.surrogate import train_surrogate
from safedl.data.dataset import Dataset, PoisonedDataset
from safedl.errors import ConfigError
from safedl.registry import register
from safedl.utils.tensors import eval_mode, frozen_params, model_device
from safedl.utils.validate import check_positive, check_range

log = logging.getLogger(__name__)


@register("backdoor", "learned_trigger")
class LearnedTrigger(BackdoorAttack):
    """A trigger optimised against a clean surrogate, stamped into ``poison_fraction`` of the training set.

    ``fit(train, *, surrogate=None)`` learns ``pattern_`` (C x s x s) and ``mask_`` (1 x s x s), s x s being
    ``patch_size_ratio`` of the image area at ``position``: Adam on sigmoid-parametrised pattern and mask for
    ``steps`` batches of non-target training images minimising CE(f(stamped), target) + ``lambda_l1`` * mean(mask)
    + ``lambda_tv`` * TV/pixel of mask and masked pattern. The default position is the centre: a patch in a
    border that is blank in every training image (MNIST) cannot move the surrogate, so nothing would be learned
    there. Without a surrogate, ``fit`` trains one on the clean
    ``train``; ``poison`` calls ``fit`` itself when the attack is not fitted yet.
    """

    def __init__(self, *, target_class: int = 0, patch_size_ratio: float = 0.1, position: str = "center",
                 margin: int = 1, poison_fraction: float = 0.05, label_mode: str = "dirty", steps: int = 200,
                 batch_size: int = 128, lr: float = 0.1, lambda_l1: float = 0.01, lambda_tv: float = 0.01,
                 seed: int = 0):
        self._init_common(target_class=target_class, poison_fraction=poison_fraction, label_mode=label_mode,
                          blend_alpha=1.0, position=position, margin=margin, seed=seed)
        self.patch_size_ratio = float(check_range(self, "patch_size_ratio", patch_size_ratio, low=0.0, high=1.0,
                                                  low_inclusive=False))
        self.steps = check_positive(self, "steps", steps, integer=True)
        self.batch_size = check_positive(self, "batch_size", batch_size, integer=True)
        self.lr = float(check_positive(self, "lr", lr))
        self.lambda_l1 = float(check_positive(self, "lambda_l1", lambda_l1, allow_zero=True))
        self.lambda_tv = float(check_positive(self, "lambda_tv", lambda_tv, allow_zero=True))
        self.pattern_: torch.Tensor | None = None
        self.mask_: torch.Tensor | None = None
        self.surrogate_success_: float | None = None

    def fit(self, train: Dataset, *, surrogate: nn.Module | None = None, device: torch.device | str | None = None
            ) -> "LearnedTrigger":
        """Learn the trigger against ``surrogate`` (a model trained on clean data; trained here when None)."""
        check_class(self, "target_class", self.target_class, train.num_classes)
        if surrogate is None:
            surrogate = train_surrogate(train, seed=self.seed, device=device or "cpu")
        dev = model_device(surrogate)
        c, H, W = train.shape
        s = triggers.region_side(self.patch_size_ratio, (H, W))
        if self.position != "random":
            triggers.fixed_offset(self.position, image_hw=(H, W), patch_hw=(s, s), margin=self.margin,
                                  who=self.registry_name)
        g = torch.Generator().manual_seed(self.seed)
        pool = train.x[train.y != self.target_class]
        if len(pool) == 0:
            raise ConfigError(f"{self.registry_name}: the training set has no sample outside class {self.target_class}")
        theta_p = (torch.randn(c, s, s, generator=g) * 0.5).to(dev).requires_grad_(True)
        theta_m = torch.zeros(1, s, s, device=dev, requires_grad=True)  # mask starts at 0.5 everywhere
        opt = torch.optim.Adam([theta_p, theta_m], lr=self.lr)
        target = torch.full((self.batch_size,), self.target_class, dtype=torch.long, device=dev)
        with eval_mode(surrogate), frozen_params(surrogate):
            for _ in range(self.steps):
                xb = pool[torch.randint(0, len(pool), (self.batch_size,), generator=g)].to(dev)
                rows, cols = triggers.offsets(self.position, len(xb), image_hw=(H, W), patch_hw=(s, s),
                                              margin=self.margin, generator=g)
                p, m = torch.sigmoid(theta_p), torch.sigmoid(theta_m)
                xt = triggers.stamp(xb, p, m, rows, cols)
                loss = (F.cross_entropy(surrogate(xt), target)
                        + self.lambda_l1 * m.mean()
                        + self.lambda_tv * (triggers.total_variation(m) + triggers.total_variation(p * m)) / m.numel())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            self.pattern_ = torch.sigmoid(theta_p).detach().cpu()
            self.mask_ = torch.sigmoid(theta_m).detach().cpu()
            # how often the learned trigger alone already sends the surrogate to the target (diagnostic)
            xe = pool[:512].to(dev)
            rows, cols = triggers.offsets(self.position, len(xe), image_hw=(H, W), patch_hw=(s, s), margin=self.margin,
                                          generator=g)
            with torch.no_grad():
                pred = surrogate(triggers.stamp(xe, self.pattern_.to(dev), self.mask_.to(dev), rows, cols)).argmax(1)
            self.surrogate_success_ = float((pred == self.target_class).float().mean())
        log.info("learned trigger: %dx%d patch, mask mean %.3f, surrogate success %.3f", s, s,
                 float(self.mask_.mean()), self.surrogate_success_)
        return self

    def _trigger(self, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pattern_ is None or self.mask_ is None:
            raise RuntimeError(f"{self.registry_name}: call fit() (or poison()) before using the trigger")
        if self.pattern_.shape[0] != shape[0]:
            raise ConfigError(f"{self.registry_name}: the trigger was learned for {self.pattern_.shape[0]}-channel "
                              f"images, got {shape[0]} channels")
        return self.pattern_, self.mask_

    def poison(self, train: Dataset, *, generator: torch.Generator) -> PoisonedDataset:
        if self.pattern_ is None:
            log.info("%s: not fitted; training a surrogate on the clean training set", self.registry_name)
            self.fit(train)
        out = super().poison(train, generator=generator)
        out.info["surrogate_success"] = self.surrogate_success_
        return out
