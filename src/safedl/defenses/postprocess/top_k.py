"""Top-k output truncation: only the k highest scores are returned (Tramer et al., USENIX Security 2016;
Orekondy et al., "Prediction Poisoning", ICLR 2020, as a baseline)."""
from __future__ import annotations

import torch

from safedl.defenses.postprocess._base import Postprocessor
from safedl.registry import register
from safedl.utils.validate import check_positive


@register("postprocessor", "top_k")
class TopK(Postprocessor):
    """Keep the ``k`` largest probabilities, zero the rest (not renormalised, like an API showing top-k only)."""

    def __init__(self, *, k: int = 1):
        super().__init__()
        self.k = check_positive(self, "k", k, integer=True)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        p = logits.softmax(1)
        k = min(self.k, p.shape[1])
        idx = p.topk(k, dim=1).indices
        return torch.zeros_like(p).scatter(1, idx, p.gather(1, idx))
