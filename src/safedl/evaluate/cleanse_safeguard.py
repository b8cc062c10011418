"""The whole-mode safeguard: say so when what a cleanser flagged looks like a whole mode of one class.

A cleanser without trusted data can take a clean but distinct mode of a class (hard or rarely written digits, a
sub-population) for poison. Removing such a mode costs that class most of its clean accuracy on held-out data, so
per class this compares the held-out accuracy of the model trained on all the data with that of the model retrained
on the kept data: a class that lost ``min_flag_share`` or more of its training samples and kept less than
``max_kept_accuracy`` of its held-out accuracy is reported (the flagged samples were likely clean and the retrained
model is no fix). Measured case: digits seed 2, 10% single-pixel backdoor, isolate_cross_fit with no trusted
data flagged 28 of the 109 training samples of the clean class 1 (26%) and none of the poison
(bench/results/poison_generalization_untrusted.jsonl).
"""
from __future__ import annotations

import torch
from torch import nn

from safedl.data.dataset import Dataset
from safedl.utils.tensors import predict


def per_class_accuracy(model: nn.Module, data: Dataset, *, device: str | torch.device = "cpu") -> list[float | None]:
    """Accuracy of ``model`` on each class of ``data`` (None for a class without samples)."""
    pred = predict(model, data.x.to(device)).cpu()
    return [float((pred[data.y == c] == c).float().mean()) if bool((data.y == c).any()) else None
            for c in range(data.num_classes)]


def whole_mode_classes(*, flagged: torch.Tensor, labels: torch.Tensor, acc_before: list[float | None],
                       acc_after: list[float | None], min_flag_share: float = 0.15,
                       max_kept_accuracy: float = 0.5) -> list[dict]:
    """Classes where the flagged samples look like a whole mode: at least ``min_flag_share`` of the class flagged
    and held-out accuracy after removal below ``max_kept_accuracy`` x before."""
    out = []
    for c, (before, after) in enumerate(zip(acc_before, acc_after)):
        in_c = labels == c
        n_c = int(in_c.sum())
        if not n_c or before is None or after is None or before <= 0:
            continue
        n_f = int((flagged.bool() & in_c).sum())
        if n_f / n_c >= min_flag_share and after < max_kept_accuracy * before:
            out.append({"class": c, "flagged": n_f, "n": n_c, "accuracy_before": round(before, 4),
                        "accuracy_after": round(after, 4)})
    return out


def whole_mode_note(name: str, found: list[dict]) -> str:
    """The report's warning for the classes ``whole_mode_classes`` found."""
    parts = [f"class {d['class']}: {d['flagged']} of its {d['n']} training samples flagged, held-out accuracy "
             f"{d['accuracy_before']:.3f} -> {d['accuracy_after']:.3f}" for d in found]
    return (f"warning: what {name} flagged looks like a whole mode of a class, not poison ({'; '.join(parts)}); "
            "the flagged samples are probably clean and the model retrained without them is no fix")
