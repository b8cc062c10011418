"""Per-class monitoring: per-class accuracy and confusion drift of a model against a clean reference model.

Both models (the reference trained with the same recipe on data known to be clean, e.g. the baseline) predict the
trusted set. A class is flagged when its accuracy falls by more than ``min_drop``, or
the share of all predictions that go to it rises by more than ``min_share_gain``, and the change is significant by
McNemar's paired test at ``z`` (the two models predict the same images): label flipping from a source to a target class lowers the source's accuracy and sends its
images to the target, which this names. A backdoor that leaves clean accuracy unchanged is invisible here (the
trusted set holds no triggers). Diagnostics only: nothing changes.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from safedl.data.dataset import Dataset
from safedl.registry import register
from safedl.utils.tensors import predict
from safedl.utils.validate import check_positive, check_range


def _paired_shift(lost: torch.Tensor, won: torch.Tensor, n: torch.Tensor, *, z: float,
                  minimum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: net share ``(lost - won) / n`` and whether it is significant by McNemar's paired test
    (``lost - won > z sqrt(lost + won)``) and above ``minimum``."""
    net = lost - won
    share = net / n.clamp_min(1)
    return share, (share > minimum) & (net > z * (lost + won).sqrt())


@register("inspector", "per_class_monitoring")
class PerClassMonitoring:
    """Flag classes whose accuracy drops, or that absorb predictions, against a clean reference model."""

    trusted_data: ClassVar[str] = "required"

    def __init__(self, *, min_drop: float = 0.05, min_share_gain: float = 0.01, z: float = 3.0):
        self.min_drop = check_range(self, "min_drop", min_drop, low=0.0, high=1.0)
        self.min_share_gain = check_range(self, "min_share_gain", min_share_gain, low=0.0, high=1.0)
        self.z = check_positive(self, "z", z)

    def inspect(self, model: nn.Module, *, reference: nn.Module, data: Dataset,
                device: str | torch.device = "cpu") -> dict:
        k, n = data.num_classes, len(data)
        x = data.x.to(device)
        pm, pr = predict(model, x).cpu(), predict(reference, x).cpu()
        y = data.y
        counts = torch.bincount(y, minlength=k).double()
        hits_m, hits_r = pm == y, pr == y

        def per_class(mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return torch.bincount(index[mask], minlength=k).double()

        # accuracy: class-c images the reference gets right and the model wrong (lost) or the reverse (won)
        drop, drop_flag = _paired_shift(per_class(hits_r & ~hits_m, y), per_class(hits_m & ~hits_r, y), counts,
                                        z=self.z, minimum=self.min_drop)
        # predictions: images the model sends to c and the reference does not (gained), or the reverse
        gain, gain_flag = _paired_shift(per_class(pm != pr, pm), per_class(pm != pr, pr),
                                        torch.full((k,), float(n)), z=self.z, minimum=self.min_share_gain)
        acc_m, acc_r = per_class(hits_m, y) / counts.clamp_min(1), per_class(hits_r, y) / counts.clamp_min(1)
        flagged = sorted({int(c) for c in torch.nonzero(drop_flag | gain_flag).flatten()})
        conf = torch.zeros(k, k)
        conf.index_put_((data.y, pm), torch.ones(n), accumulate=True)
        conf.fill_diagonal_(0)
        self.report_ = {"suspicious": bool(flagged), "flagged_classes": flagged,
                        "accuracy_dropped": [int(c) for c in torch.nonzero(drop_flag).flatten()],
                        "absorbing_classes": [int(c) for c in torch.nonzero(gain_flag).flatten()],
                        "per_class_accuracy": acc_m.tolist(), "per_class_accuracy_reference": acc_r.tolist(),
                        "per_class_prediction_share_gain": gain.tolist(), "top_confusion": conf.argmax(1).tolist()}
        return self.report_
