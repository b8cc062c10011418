"""Shared base of output postprocessors: logits -> scores (probabilities), applied to the deployed model's output."""
from __future__ import annotations

from typing import ClassVar

from torch import nn


class Postprocessor(nn.Module):
    """logits (N x K) -> scores (N x K, non-negative).

    ``preserves_argmax``: the top-1 label of the scores is always the model's top-1 label, so clean accuracy is
    unchanged; only the information in the scores (for extraction and score-based attacks) is reduced.
    """

    preserves_argmax: ClassVar[bool] = True

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "training")
