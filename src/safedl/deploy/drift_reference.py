"""The drift reference a bundle carries: penultimate-layer features, predicted and true labels of (up to
``MAX_REFERENCE`` images of) the run's validation split, from which ``safedl serve`` tests its traffic for drift.

Stored as ``drift/reference.safetensors`` (tensors ``features`` float32 m x D, ``pred_labels`` and ``labels`` int64
m), so its sha256 is in the manifest's ``files`` like every other file; the manifest's ``drift`` section records
the split, the counts, the feature dimension and the label distributions. The features are those of the bundle's
bare model (``safedl.models.features``: the input of its last ``nn.Linear``, or ``model.feature_layer``) on the raw
images, the same representation the service reads from each request's decoded pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safedl.errors import BundleError, UserError

FILE = "drift/reference.safetensors"
MAX_REFERENCE = 1000  # images: enough for the two-sample tests, small enough for one test in well under 250 ms


@dataclass(frozen=True)
class DriftReference:
    """Reference sample of a bundle: ``features`` (m x D), ``pred_labels`` and ``labels`` (m), ``num_classes``."""

    features: torch.Tensor
    pred_labels: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    split: str = "val"

    def counts(self, which: str) -> list[int]:
        """Per-class counts of ``"pred"`` (the model's labels) or ``"true"`` labels."""
        y = self.pred_labels if which == "pred" else self.labels
        return torch.bincount(y, minlength=self.num_classes).tolist()

    def manifest_entry(self) -> dict[str, Any]:
        return {"file": FILE, "split": self.split, "n": int(len(self.features)), "dim": int(self.features.shape[1]),
                "num_classes": self.num_classes, "label_counts": self.counts("true"),
                "pred_counts": self.counts("pred")}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"features": self.features.float(), "pred_labels": self.pred_labels.long(),
                "labels": self.labels.long()}


def compute_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, num_classes: int,
                      max_images: int = MAX_REFERENCE, seed: int = 0, split: str = "val") -> DriftReference:
    """The reference of ``model`` on images ``x`` with labels ``y`` (a seeded subsample when over ``max_images``)."""
    from safedl.models.features import extract_features
    from safedl.utils.tensors import eval_mode, model_device

    if len(x) < 2:
        raise UserError(f"the {split} split has {len(x)} images; a drift reference needs at least 2 "
                        "(set dataset.val_fraction > 0)")
    if len(x) > max_images:
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_images].sort().values
        x, y = x[idx], y[idx]
    feats = extract_features(model, x)
    dev = model_device(model)
    with torch.no_grad(), eval_mode(model):
        pred = torch.cat([model(x[i:i + 512].to(dev)).argmax(1).cpu() for i in range(0, len(x), 512)])
    return DriftReference(features=feats.float(), pred_labels=pred.long(), labels=y.long().cpu(),
                          num_classes=int(num_classes), split=split)


def reference_from_tensors(tensors: dict[str, torch.Tensor], entry: dict[str, Any], *, where: Path) -> DriftReference:
    """A reference from its verified file's tensors and its manifest entry; BundleError when they disagree."""
    try:
        feats, pred, labels = tensors["features"], tensors["pred_labels"], tensors["labels"]
        n, k = int(entry["n"]), int(entry["num_classes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{where}: the drift reference lacks {exc} (tensors features, pred_labels, labels; "
                          "manifest drift.n, drift.num_classes)") from None
    if feats.ndim != 2 or len(feats) != n or pred.shape != (n,) or labels.shape != (n,) or n < 2:
        raise BundleError(f"{where}: the drift reference's shapes (features {tuple(feats.shape)}, pred_labels "
                          f"{tuple(pred.shape)}, labels {tuple(labels.shape)}) do not match drift.n = {n}")
    if not torch.isfinite(feats).all() or int(pred.min()) < 0 or int(pred.max()) >= k:
        raise BundleError(f"{where}: the drift reference holds non-finite features or labels outside 0..{k - 1}")
    return DriftReference(features=feats.float(), pred_labels=pred.long(), labels=labels.long(), num_classes=k,
                          split=str(entry.get("split", "val")))

