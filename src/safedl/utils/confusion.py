"""The full confusion matrix of a model's clean predictions (counts; row = true class, column = predicted class)."""
from __future__ import annotations

import torch


def confusion_counts(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[list[int]]:
    """K x K counts: entry [i][j] is the number of test images of true class i predicted as class j."""
    k = int(num_classes)
    pred, y = pred.detach().cpu().long().reshape(-1), y.detach().cpu().long().reshape(-1)
    if len(pred) != len(y):
        raise ValueError(f"confusion_counts: {len(pred)} predictions for {len(y)} labels")
    if len(y) and (int(pred.min()) < 0 or int(pred.max()) >= k or int(y.min()) < 0 or int(y.max()) >= k):
        raise ValueError(f"confusion_counts: a class index is outside 0..{k - 1}")
    flat = torch.bincount(y * k + pred, minlength=k * k)
    return flat.reshape(k, k).tolist()
