"""Per-key output hardening tiers: how much of the scores a client sees (the extraction defenses of the
postprocess layer as a per-client policy; Tramer et al., "Stealing Machine Learning Models via Prediction APIs",
USENIX Security 2016, section 8: rounding, top-k and label-only outputs).

``full``: every class probability and the detector scores; ``rounded``: probabilities rounded to ``decimals``;
``topk``: the ``k`` most likely classes with their probabilities; ``label``: the label and class name only.
Applied to the bundle's output, after its own postprocessors.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no torch import at run time: the key store (and `safedl keys`) load this module
    import torch


TIERS = ("full", "rounded", "topk", "label")


def harden(probs: torch.Tensor, *, tier: str, decimals: int = 2, k: int = 3) -> list[dict]:
    """Per image, the score fields this tier may see (batched tensor ops; one dict per row of ``probs``)."""
    if tier == "label":
        return [{} for _ in range(probs.shape[0])]
    if tier == "full":
        return [{"probabilities": row} for row in probs.tolist()]
    if tier == "rounded":
        scale = 10.0 ** decimals
        return [{"probabilities": row} for row in ((probs * scale).round() / scale).tolist()]
    if tier == "topk":
        vals, idx = probs.topk(min(k, probs.shape[1]), dim=1)
        return [{"top_k": [{"label": int(i), "probability": float(v)} for i, v in zip(ir, vr)]}
                for ir, vr in zip(idx.tolist(), vals.tolist())]
    raise ValueError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
