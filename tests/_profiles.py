"""``tiny_profile(**overrides)``: the small seeded profile the run tests share (digits, tiny_cnn, a few epochs),
with each section's keys overridden in place (nested mappings merge, anything else replaces)."""
from __future__ import annotations

import copy
from typing import Any

BASE: dict[str, Any] = {
    "name": "tiny", "seed": 0,
    "dataset": {"name": "digits", "test_fraction": 0.2, "val_fraction": 0.1},
    "model": {"arch": "tiny_cnn"},
    "training": {"epochs": 4, "batch_size": 64, "lr": 0.003, "augment": "none"},
    "evaluation": {"n_eval": 60, "batch_size": 60, "n_examples": 0},
}


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in: mappings recursively, other values replaced; ``None`` drops a key."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_profile(**overrides: Any) -> dict[str, Any]:
    """A fresh copy of the shared tiny profile with ``overrides`` merged in."""
    return merged(BASE, overrides)
