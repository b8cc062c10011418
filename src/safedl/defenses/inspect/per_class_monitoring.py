"""Per-class monitoring: classes whose accuracy is unusually low compared with the others.

Label flipping and targeted poisoning hurt some classes far more than the average; a class whose accuracy on a
trusted set is below mean - ``k`` x std of the per-class accuracies is flagged. Diagnostics only: nothing changes.
"""
from __future__ import annotations

import torch
from torch import nn

from safedl.data.dataset import Dataset
from safedl.registry import register
from safedl.utils.tensors import predict
from safedl.utils.validate import check_positive


@register("inspector", "per_class_monitoring")
class PerClassMonitoring:
    """Flag classes whose accuracy is below mean - k std of the per-class accuracies."""

    def __init__(self, *, k: float = 1.5):
        self.k = check_positive(self, "k", k)

    def inspect(self, model: nn.Module, *, data: Dataset, device: str | torch.device = "cpu") -> dict:
        pred = predict(model, data.x.to(device)).cpu()
        correct = (pred == data.y).float()
        counts = torch.bincount(data.y, minlength=data.num_classes).float()
        acc = torch.bincount(data.y, weights=correct, minlength=data.num_classes) / counts.clamp_min(1)
        present = counts > 0
        mean, std = float(acc[present].mean()), float(acc[present].std()) if int(present.sum()) > 1 else 0.0
        cut = mean - self.k * std
        flagged = [int(c) for c in torch.nonzero(present & (acc < cut)).flatten()]
        # which wrong class absorbs each class's errors (a flip map leaves this trace)
        conf = torch.zeros(data.num_classes, data.num_classes)
        conf.index_put_((data.y, pred), torch.ones(len(pred)), accumulate=True)
        conf.fill_diagonal_(0)
        self.report_ = {"per_class_accuracy": acc.tolist(), "counts": counts.long().tolist(), "mean": mean, "std": std,
                        "threshold": cut, "flagged_classes": flagged, "top_confusion": conf.argmax(1).tolist()}
        return self.report_
