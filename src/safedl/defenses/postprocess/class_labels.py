"""Labels-only output: a one-hot vector of the predicted class (Tramer et al., USENIX Security 2016)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from safedl.defenses.postprocess._base import Postprocessor
from safedl.registry import register


@register("postprocessor", "class_labels")
class ClassLabels(Postprocessor):
    """Return only the top-1 label as a one-hot score vector: score-based attacks get no confidence information."""

    def __init__(self) -> None:
        super().__init__()

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return F.one_hot(logits.argmax(1), logits.shape[1]).to(logits.dtype)
