"""Confusion matrices of an evasion-defended system's decisions: rows are true classes, columns the predicted
classes and one last column for rejected images (a detector flagged them or the certifier abstained)."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch

from safedl.utils.confusion import confusion_counts


def decision_confusion(labels: torch.Tensor, rejected: torch.Tensor, y: torch.Tensor, num_classes: int
                       ) -> list[list[int]]:
    """K x (K + 1) counts: [i][j] images of true class i answered j; [i][K] images of class i rejected."""
    k = int(num_classes)
    pred = torch.where(rejected.cpu().bool(), torch.full_like(labels.cpu().long(), k), labels.cpu().long())
    return confusion_counts(pred, y, k + 1)[:k]


def evasion_confusions(decisions: dict[str, Any], y: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """The results entry's ``confusion_evasion``: one matrix per named set of decisions (clean, non-adaptive,
    adaptive), each with its row sums equal to the number of evaluation images of that class."""
    return {"columns": "predicted class 0..K-1, then rejected",
            "matrices": {name: decision_confusion(d.labels, d.rejected, y, num_classes)
                         for name, d in decisions.items()}}


def worst_case_decision(decisions: Sequence[Any], y: torch.Tensor) -> Any:
    """Per sample, the first of ``decisions`` (one per attack of the adaptive suite, same images) under which the
    sample is not defended, else the first one: the per-sample union behind ``robust_accuracy``, as one decision
    with labels, probabilities, rejections, reasons and detector scores taken from the chosen attack."""
    if not decisions:
        raise ValueError("worst_case_decision: needs at least one decision")
    y = y.to(decisions[0].labels.device)
    broken = torch.stack([~d.defended(y).to(y.device) for d in decisions])  # A x N
    pick = torch.where(broken.any(0), broken.float().argmax(0), torch.zeros_like(y))
    rows = torch.arange(len(y), device=y.device)

    def take(field: str) -> torch.Tensor:
        return torch.stack([getattr(d, field).to(y.device) for d in decisions])[pick, rows]

    names = [n for n in decisions[0].detector_scores if all(n in d.detector_scores for d in decisions)]
    scores = {n: torch.stack([d.detector_scores[n].to(y.device) for d in decisions])[pick, rows] for n in names}
    chosen = pick.tolist()
    return replace(decisions[0], labels=take("labels"), probs=take("probs"), rejected=take("rejected"),
                   reasons=[decisions[a].reasons[i] for i, a in enumerate(chosen)], detector_scores=scores,
                   thresholds={n: decisions[0].thresholds[n] for n in names})
