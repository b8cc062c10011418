"""ART postprocessors as safedl postprocessors (``art:ReverseSigmoid``, ``art:Rounded``, ``art:HighConfidence``,
``art:ClassLabels``, ``art:GaussianNoise``): logits -> softmax probabilities -> ART's numpy transformation ->
scores. Adaptive attacks treat them straight-through, like safedl's own postprocessors."""
from __future__ import annotations

import inspect
from typing import Any, ClassVar

import numpy as np
import torch

from safedl.defenses.postprocess._base import Postprocessor
from safedl.errors import ConfigError
from safedl.integrations.art.estimator import numpy_seed

#: ART postprocessors whose output can change the top-1 label (ART 1.20.1's ClassLabels sets, in every row of a
#: batch, the argmax column of every row, so its labels are wrong for batches of more than one image)
CHANGES_ARGMAX = frozenset({"GaussianNoise", "ClassLabels"})
OWN_PARAMS = [inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, default=0, annotation="int | None")]


class ArtPostprocessor(Postprocessor):
    """Base of the generated ``art:<Class>`` postprocessor adapters (one subclass per ART class)."""

    art_class: ClassVar[type]
    art_param_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **params: Any):
        super().__init__()
        self.seed = params.pop("seed")
        self._calls = 0
        for key, value in params.items():
            setattr(self, key, value)
        try:
            self._art = self.art_class(**params, apply_fit=False, apply_predict=True)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"postprocessor {self.registry_name!r}: ART refused the parameters {params!r}: {exc}"
                              ) from None

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        self._calls += 1
        probs = logits.detach().float().softmax(1).cpu().numpy()
        with numpy_seed(None if self.seed is None else int(self.seed) + self._calls):
            out = self._art(probs)
        return torch.as_tensor(np.asarray(out, dtype=np.float32)).to(logits.device).clamp_min(0)
