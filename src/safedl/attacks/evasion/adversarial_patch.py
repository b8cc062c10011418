"""Universal adversarial patch (Brown, Mane, Roy, Abadi & Gilmer, "Adversarial Patch", 2017): one square patch,
trained by Expectation over Transformation over random locations, pasted over any image."""
from __future__ import annotations

import logging
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from safedl.attacks.base import EvasionAttack, make_generator
from safedl.data.dataset import Dataset
from safedl.registry import register
from safedl.utils.tensors import eval_mode, frozen_params
from safedl.utils.validate import check_positive, check_range

log = logging.getLogger(__name__)


def patch_side(fraction: float, h: int, w: int) -> int:
    """The side of the largest square patch whose area is at most ``fraction`` of an h x w image (at least 1)."""
    return max(1, min(h, w, int(math.floor(math.sqrt(fraction * h * w) + 1e-9))))


def random_offsets(n: int, s: int, h: int, w: int, gen: torch.Generator | None, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the top-left corner (row, column) of an s x s patch, uniform over every position inside."""
    r = torch.randint(0, h - s + 1, (n,), generator=gen, device=device)
    c = torch.randint(0, w - s + 1, (n,), generator=gen, device=device)
    return r, c


def paste(x: torch.Tensor, patch: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` with the C x s x s ``patch`` pasted at each image's (row, column); returns (images, support N x 1 x H x W).

    Differentiable in ``patch``; pixels outside the support are exactly ``x``'s.
    """
    n, _, h, w = x.shape
    s = patch.shape[-1]
    ri = torch.arange(h, device=x.device).view(1, h, 1) - rows.view(n, 1, 1)  # n x h x 1
    ci = torch.arange(w, device=x.device).view(1, 1, w) - cols.view(n, 1, 1)  # n x 1 x w
    support = ((ri >= 0) & (ri < s) & (ci >= 0) & (ci < s)).unsqueeze(1)  # n x 1 x h x w
    canvas = patch[:, ri.clamp(0, s - 1), ci.clamp(0, s - 1)].permute(1, 0, 2, 3)  # n x C x h x w
    return torch.where(support, canvas, x), support


@register("evasion", "adversarial_patch")
class AdversarialPatch(EvasionAttack):
    """A universal square patch covering ``patch_fraction`` of the image area (the threat is a patch, not an L-p
    ball: any pixel values inside the patch, pixels outside unchanged). Training is the paper's EOT over random
    locations (no rotation or scaling here): ``steps`` Adam steps (``lr``) on the patch, each on ``batch_size``
    images with the patch at fresh uniform random positions, minimising cross-entropy to ``target_class`` (the
    paper's targeted patch) or, with ``target_class=None``, maximising the cross-entropy of the true labels (our
    untargeted variant); per-sample targets given at call time take precedence. ``fit(train, model=...)`` trains
    the patch once on training images (a universal patch, as deployed against unseen images); an attack never
    fitted trains it on the batch it is called with. At call time the patch is pasted at a seeded random location
    per image; ``support_`` holds the last call's patch masks (N x 1 x H x W) and ``patch_`` the patch.
    ``with_penalty(p)`` (our detector-aware variant) adds the batch mean of ``p`` on the patched images to the loss.
    """

    access: ClassVar[str] = "white-box"
    takes_penalty: ClassVar[bool] = True
    conformance_params: ClassVar[dict] = {"patch_fraction": 0.15, "steps": 60}

    def __init__(self, *, patch_fraction: float = 0.1, steps: int = 200, lr: float = 0.05, batch_size: int = 128,
                 target_class: int | None = None, seed: int | None = 0):
        self.patch_fraction = float(check_range(self, "patch_fraction", patch_fraction, low=0.0, high=1.0,
                                                low_inclusive=False))
        self.steps = check_positive(self, "steps", steps, integer=True)
        self.lr = float(check_positive(self, "lr", lr))
        self.batch_size = check_positive(self, "batch_size", batch_size, integer=True)
        if target_class is not None:
            check_range(self, "target_class", target_class, low=0, integer=True)
        self.target_class = target_class
        self.seed = seed
        self.norm = "patch"

    def threat(self) -> dict:
        """The threat model in words and numbers, for the results entry."""
        return {"kind": "patch", "area_fraction": self.patch_fraction,
                "description": f"a square patch of at most {self.patch_fraction:g} of the image area at a random "
                               "location, any values inside it, pixels outside unchanged (no L-p bound)"}

    def fit(self, train: Dataset, *, model: nn.Module, device: torch.device | str = "cpu") -> "AdversarialPatch":
        """Train the universal patch on the training images (their true labels, for the untargeted loss)."""
        with eval_mode(model), frozen_params(model):
            self.patch_ = self._train(model, train.x.to(device), train.y.to(device), None)
        return self

    def _train(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        n, c, h, w = x.shape
        s = patch_side(self.patch_fraction, h, w)
        gen = make_generator(self.seed, x.device)
        patch = torch.rand((c, s, s), generator=gen, device=x.device).requires_grad_(True)
        opt = torch.optim.Adam([patch], lr=self.lr)
        if target is None and self.target_class is not None:
            target = torch.full_like(y, int(self.target_class))
        for _ in range(self.steps):
            pick = torch.randint(0, n, (min(self.batch_size, n),), generator=gen, device=x.device)
            rows, cols = random_offsets(len(pick), s, h, w, gen, x.device)
            with torch.enable_grad():
                xp = paste(x[pick], patch.clamp(0, 1), rows, cols)[0]
                logits = model(xp)
                loss = (F.cross_entropy(logits, target[pick]) if target is not None
                        else -F.cross_entropy(logits, y[pick]))
                if self._penalty is not None:  # with_penalty: e.g. keep every detector under its threshold
                    loss = loss + self._penalty(xp).mean()
                (grad,) = torch.autograd.grad(loss, patch)
            patch.grad = grad
            opt.step()
            with torch.no_grad():
                patch.clamp_(0, 1)
        return patch.detach()

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        patch = getattr(self, "patch_", None)
        if patch is None or patch.shape[0] != x.shape[1] or target is not None:
            patch = self._train(model, x, y, target)  # never fitted (or per-sample targets): fit on this batch
        gen = make_generator(None if self.seed is None else self.seed + 1, x.device)
        rows, cols = random_offsets(len(x), patch.shape[-1], x.shape[2], x.shape[3], gen, x.device)
        x_adv, self.support_ = paste(x, patch.to(x), rows, cols)
        return x_adv
