"""Fitted component state as plain tensors and JSON, so bundles hold no pickled code.

A component's fitted state is its attributes whose names end in ``_`` (scikit-learn's convention), except the
model it was fitted on (``model_``: the bundle stores that model once). Tensors and lists of tensors go to a
safetensors file; numbers, strings, booleans and JSON-able lists/dicts go to the manifest. Anything else cannot be
stored without pickle and is refused at export.
"""
from __future__ import annotations

import json
from typing import Any

import torch

from safedl.errors import BundleError

SKIP = ("model_",)


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def fitted_state(component: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, json) holding every fitted attribute of ``component``; raises BundleError for other types."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"scalars": {}, "lists": {}, "floats": {}}
    for name, value in vars(component).items():
        if not name.endswith("_") or name.startswith("_") or name in SKIP:
            continue
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().cpu().contiguous()
        elif isinstance(value, (list, tuple)) and value and all(isinstance(t, torch.Tensor) for t in value):
            meta["lists"][name] = len(value)
            for i, t in enumerate(value):
                tensors[f"{name}.{i}"] = t.detach().cpu().contiguous()
        elif isinstance(value, float) and not _jsonable(value):  # nan / inf
            meta["floats"][name] = repr(value)
        elif _jsonable(value):
            meta["scalars"][name] = value
        else:
            raise BundleError(f"{component.registry_kind} {component.registry_name!r}: fitted attribute {name!r} "
                              f"of type {type(value).__name__} cannot be stored without pickle")
    return tensors, meta


def restore_state(component: Any, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                  device: torch.device) -> None:
    """Set the attributes saved by :func:`fitted_state` on a freshly constructed component."""
    for name, value in meta.get("scalars", {}).items():
        setattr(component, name, value)
    for name, value in meta.get("floats", {}).items():
        setattr(component, name, float(value))
    for name, n in meta.get("lists", {}).items():
        setattr(component, name, [tensors[f"{name}.{i}"].to(device) for i in range(int(n))])
    listed = {f"{k}.{i}" for k, n in meta.get("lists", {}).items() for i in range(int(n))}
    for name, t in tensors.items():
        if name not in listed:
            setattr(component, name, t.to(device))
