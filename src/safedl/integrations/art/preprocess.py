"""ART preprocessors as safedl preprocessors (``art:SpatialSmoothing``, ``art:FeatureSqueezing``,
``art:JpegCompression``, ...): ART's numpy transformation in [0, 1] pixel space (``clip_values=(0, 1)``, channels
first), as an ``nn.Module`` in the defended pipeline.

ART's numpy code has no autograd, so the adapter is ``differentiable = False``: adaptive attacks on the defended
system go through it with BPDA (Athalye et al. 2018), identity backward, exactly as for safedl's own
non-differentiable preprocessors. Randomized ART preprocessors (``GaussianAugmentation``) are flagged
``randomized`` so the adaptive attacks average over them (EOT).
"""
from __future__ import annotations

import inspect
from typing import Any, ClassVar

import numpy as np
import torch

from safedl.defenses.preprocess._base import Preprocessor
from safedl.errors import ConfigError
from safedl.integrations.art.estimator import numpy_seed

#: ART preprocessors that draw fresh randomness on every call
RANDOMIZED = frozenset({"GaussianAugmentation", "Cutout", "CutoutPyTorch"})
OWN_PARAMS = [inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, default=0, annotation="int | None")]


class ArtPreprocessor(Preprocessor):
    """Base of the generated ``art:<Class>`` preprocessor adapters (one subclass per ART class)."""

    differentiable: ClassVar[bool] = False
    art_class: ClassVar[type]
    art_param_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **params: Any):
        super().__init__()
        self.seed = params.pop("seed")
        self._calls = 0
        for key, value in params.items():
            setattr(self, key, value)
        accepted = inspect.signature(self.art_class.__init__).parameters
        fixed = {"clip_values": (0.0, 1.0), "channels_first": True, "apply_fit": False, "apply_predict": True}
        kw = {**params, **{k: v for k, v in fixed.items() if k in accepted}}
        try:
            self._art = self.art_class(**kw)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"preprocessor {self.registry_name!r}: ART refused the parameters {params!r}: {exc}"
                              ) from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._calls += 1  # a randomized one draws fresh (seeded) noise on every call
        seed = None if self.seed is None else int(self.seed) + (self._calls if self.randomized else 0)
        with numpy_seed(seed):
            out, _ = self._art(x.detach().cpu().numpy().astype(np.float32))
        return torch.as_tensor(np.asarray(out), dtype=x.dtype).reshape(x.shape).to(x.device)
