"""A stage's saved state, packed losslessly for ``torch.save`` (8-bit images as uint8, a poisoned data set as the
rows the attack changed), and read back lazily when a resumed run needs it."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

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



def load_stage_state(path: Path) -> dict:
    """Read a stage's ``state.pt`` (written by ``StageCache.finish``)."""
    return unpack_state(torch.load(path, map_location="cpu", weights_only=False))



class LazyState(Mapping):
    """An attack's saved state, read from disk on first use (most resumed runs never need it)."""

    def __init__(self, path: Path):
        self._path, self._data = path, None

    def _load(self) -> dict:
        if self._data is None:
            self._data = load_stage_state(self._path)
        return self._data

    def __getitem__(self, key: str) -> Any:
        return self._load()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())
