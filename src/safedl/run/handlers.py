"""The stage evaluators a run calls, looked up in the registry (kinds ``attack_evaluator``, ``defense_evaluator``)."""
from __future__ import annotations

from typing import Callable

from safedl import registry
from safedl.evaluate.base import defense_evaluator_name


def get_attack_handler(category: str) -> Callable:
    """The evaluator of attacks of ``category``; KeyError when this installation has none."""
    if category not in registry.names("attack_evaluator"):
        raise KeyError(category)
    return registry.get("attack_evaluator", category)


def get_defense_handler(kind: str, category: str) -> Callable | None:
    """The evaluator of ``kind`` defenses against ``category`` attacks, or None when no stage can do that."""
    name = defense_evaluator_name(kind, category)
    return registry.get("defense_evaluator", name) if name in registry.names("defense_evaluator") else None


def load_handlers() -> None:
    """Import every evaluator module (the process pool's fork server does this once)."""
    registry.names("attack_evaluator")
