"""Confusion matrices of an evasion-defended system's decisions: rows are true classes, columns the predicted
classes and one last column for rejected images (a detector flagged them or the certifier abstained)."""
from __future__ import annotations

from typing import Any

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
