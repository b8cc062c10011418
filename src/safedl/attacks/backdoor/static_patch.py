"""BadNets static-patch backdoor (Gu, Dolan-Gavitt & Garg, "BadNets: Identifying Vulnerabilities in the Machine
Learning Model Supply Chain", 2017), with blended triggers (Chen et al., "Targeted Backdoor Attacks on Deep
Learning Systems Using Data Poisoning", 2017) and clean-label stamping of target-class samples."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from safedl.attacks.backdoor import triggers
from safedl.attacks.backdoor.base import BackdoorAttack
from safedl.errors import ConfigError
from safedl.registry import register
from safedl.utils.validate import check_choice, check_range


@register("backdoor", "static_patch")
class StaticPatch(BackdoorAttack):
    """Stamp a fixed trigger (pixel, checkerboard, square, seeded noise or a PNG) into a share of the training set.

    ``position``: a corner (``top_left`` ...), ``center`` or ``random`` (a fresh location per image), ``margin``
    pixels from the border. ``patch_size``: side in pixels (None: the whole image, e.g. a blended noise trigger).
    ``color``: intensity of the trigger's lit pixels, one value or one per channel. ``blend_alpha`` < 1 blends the
    trigger for low visibility. ``label_mode``: ``dirty`` relabels the poisons to ``target_class``; ``clean``
    stamps target-class samples only. ``mapping``: ``all_to_one`` (every poison to ``target_class``) or ``all_to_all``
    (label c -> c+1, Gu et al. 2017; dirty-label only). ``poison_fraction`` is a share of the whole training set.
    """

    def __init__(self, *, target_class: int = 0, trigger: str = "pattern", patch_size: int | None = 3,
                 position: str = "bottom_right", margin: int = 1, color: float | Sequence[float] = 1.0,
                 blend_alpha: float = 1.0, poison_fraction: float = 0.1, label_mode: str = "dirty",
                 image_path: str | None = None, mapping: str = "all_to_one", seed: int = 0):
        self._init_common(target_class=target_class, poison_fraction=poison_fraction, label_mode=label_mode,
                          blend_alpha=blend_alpha, position=position, margin=margin, seed=seed, mapping=mapping)
        self.trigger = check_choice(self, "trigger", trigger, triggers.TRIGGERS)
        self.patch_size = None if patch_size is None else check_range(self, "patch_size", patch_size, low=1,
                                                                       integer=True)
        if isinstance(color, (int, float)) and not isinstance(color, bool):
            self.color: float | list[float] = float(check_range(self, "color", color, low=0.0, high=1.0))
        elif isinstance(color, (list, tuple)) and color and all(isinstance(c, (int, float)) for c in color):
            for c in color:
                check_range(self, "color", c, low=0.0, high=1.0)
            self.color = [float(c) for c in color]
        else:
            raise ConfigError(f"static_patch: color={color!r} must be a number in [0, 1] or a list of them")
        if trigger == "image":
            if not image_path:
                raise ConfigError("static_patch: trigger='image' needs image_path (a PNG file)")
            if not Path(image_path).is_file():
                raise ConfigError(f"static_patch: image_path={image_path!r} is not a file")
        self.image_path = None if image_path is None else str(image_path)

    def _trigger(self, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        c, H, W = shape
        if self.patch_size is None:
            hw = (H, W)
        else:
            hw = (self.patch_size, self.patch_size)
            if hw[0] > H or hw[1] > W:
                raise ConfigError(f"static_patch: patch_size={self.patch_size} does not fit in {H}x{W} images")
        if self.trigger == "single_pixel":
            hw = (1, 1)
        return triggers.make_patch(self.trigger, channels=c, size=hw, color=self.color, noise_seed=self.seed,
                                   image_path=self.image_path)
