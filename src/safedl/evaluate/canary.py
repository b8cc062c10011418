"""Canary records: known-good samples whose predictions a run stores, so every retraining can be checked against
them (a changed prediction on a sample that was right and known to be clean is the cheapest poisoning alarm; the
"canary" inputs of Steinhardt et al.-style data sanitisation audits, here as a regression check of the model).

The records are the first ``n`` test images (``source: holdout``; a retrain keeps the test split) or an ``.npz``
the user vouches for (``source: path``). A run stores their labels, the model's predictions and a hash of the
images, so a later run is compared on exactly the same records."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from safedl.data.dataset import Splits
from safedl.data.loaders import load_npz
from safedl.errors import DataError
from safedl.profile_inputs import CanarySpec
from safedl.utils.io import tensor_hash
from safedl.utils.stats import proportion
from safedl.utils.tensors import predict


def canary_records(spec: CanarySpec, splits: Splits) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The canary images and labels (None when ``source`` is ``none``); DataError when the source is too small
    or its images do not match the data set's."""
    if spec.source == "none":
        return None
    if spec.source == "holdout":
        x, y, where = splits.test.x, splits.test.y, "the test split"
    else:
        data = load_npz(spec.path)  # type: ignore[arg-type]
        x, y, where = data.x, data.y, spec.path
        if tuple(x.shape[1:]) != splits.shape:
            raise DataError(f"canary_records.path {spec.path}: images of shape {tuple(x.shape[1:])}, the data set's "
                            f"are {splits.shape} (C x H x W)")
        if int(y.max()) >= splits.num_classes:
            raise DataError(f"canary_records.path {spec.path}: label {int(y.max())} is not a class of this data set "
                            f"(classes are 0..{splits.num_classes - 1})")
    if spec.n > len(x):
        raise DataError(f"canary_records.n = {spec.n} but {where} holds only {len(x)} images")
    return x[: spec.n], y[: spec.n]


def canary_entry(spec: CanarySpec, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 device: torch.device | str = "cpu") -> dict[str, Any]:
    """What a run stores about its canary records (results.json ``canaries``)."""
    pred = predict(model, x.to(device)).cpu()
    return {"source": spec.source, "path": spec.path, "n": len(x), "images_sha256": tensor_hash(x, y),
            "labels": y.tolist(), "predictions": pred.tolist(), "correct": int((pred == y).sum()),
            "max_changes": spec.max_changes}


def canary_changes(before: nn.Module, after: nn.Module, x: torch.Tensor, *, device: torch.device | str = "cpu"
                   ) -> list[int]:
    """Indices of the canary records ``after`` predicts differently from ``before``."""
    a, b = predict(before, x.to(device)).cpu(), predict(after, x.to(device)).cpu()
    return torch.nonzero(a != b).flatten().tolist()


def canary_change_metric(spec: CanarySpec, splits: Splits, baseline: nn.Module, model: nn.Module, *,
                         device: torch.device | str = "cpu") -> dict[str, Any] | None:
    """``canary_changes``: the share (Wilson interval, n) of canary records ``model`` predicts differently from the
    clean ``baseline`` (None without canary records); the gate's ``max_canary_changes`` counts them."""
    canaries = canary_records(spec, splits)
    if canaries is None:
        return None
    return proportion(len(canary_changes(baseline, model, canaries[0], device=device)), len(canaries[0]))
