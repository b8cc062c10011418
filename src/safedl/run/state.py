"""A stage's saved state, packed losslessly for ``torch.save`` (8-bit images as uint8, a poisoned data set as the
rows the attack changed: safedl/data/packing.py), and read back lazily when a resumed run needs it."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

from safedl.data.packing import load_packed, pack_state, unpack_state

__all__ = ["LazyState", "load_stage_state", "pack_state", "unpack_state"]


def load_stage_state(path: Path) -> dict:
    """Read a stage's ``state.pt`` (written by ``StageCache.finish``)."""
    return load_packed(path)


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
