"""Lossless packing of a run stage's saved state for ``torch.save``: float images that are exact 8-bit values as
uint8, a poisoned data set as the rows the attack changed next to the originals (run/state.py saves and reads stage
states with it; deploy/run_probes.py reads the stored adversarial and triggered examples for a bundle's probes)."""
from __future__ import annotations

from typing import Any

import torch

from safedl.data.dataset import PoisonedDataset

_U8 = "__safedl_uint8__"
_POISONED = "__safedl_poisoned__"


def _as_uint8(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as uint8 when it holds exactly k/255 values (8-bit images), so the round trip is lossless; else None."""
    if t.dtype != torch.float32 or t.numel() < 256:
        return None
    q = (t * 255).round()
    if bool(((q < 0) | (q > 255)).any()):
        return None
    u = q.to(torch.uint8)
    return u if torch.equal(u.float() / 255, t) else None


def pack_state(obj: Any) -> Any:
    """A smaller, lossless form of a stage's state for ``torch.save``: float images that are exact 8-bit values are
    stored as uint8, and a poisoned data set keeps only the rows the attack changed next to the originals."""
    if isinstance(obj, PoisonedDataset):
        changed = (obj.x != obj.original_x).flatten(1).any(1)
        fields = {"rows": changed.nonzero().flatten(), "x_rows": obj.x[changed], "y": obj.y,
                  "num_classes": obj.num_classes, "name": obj.name, "class_names": obj.class_names,
                  "is_poison": obj.is_poison, "original_x": obj.original_x, "original_y": obj.original_y,
                  "info": obj.info}
        return {_POISONED: pack_state(fields)}
    if isinstance(obj, torch.Tensor):
        u = _as_uint8(obj)
        return obj if u is None else {_U8: u}
    if isinstance(obj, dict):
        return {k: pack_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(pack_state(v) for v in obj)
    return obj


def unpack_state(obj: Any) -> Any:
    """The inverse of ``pack_state`` (states saved unpacked by older versions pass through unchanged)."""
    if isinstance(obj, dict) and set(obj) == {_U8}:
        return obj[_U8].float() / 255
    if isinstance(obj, dict) and set(obj) == {_POISONED}:
        f = unpack_state(obj[_POISONED])
        x = f["original_x"].clone()
        x[f["rows"]] = f["x_rows"]
        return PoisonedDataset(x, f["y"], f["num_classes"], f["name"], f["class_names"], is_poison=f["is_poison"],
                               original_x=f["original_x"], original_y=f["original_y"], info=f["info"])
    if isinstance(obj, dict):
        return {k: unpack_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(unpack_state(v) for v in obj)
    return obj


def load_packed(path: Any) -> Any:
    """A ``torch.save``d packed state read back and unpacked (it may hold pickled objects: the run's own files
    only)."""
    return unpack_state(torch.load(path, map_location="cpu", weights_only=False))
