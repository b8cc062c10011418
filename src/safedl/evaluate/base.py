"""Stage handlers by component kind: how a run simulates an attack of a category, or evaluates a defense of a kind.

An attack handler ``fn(ctx, spec, attack) -> AttackOutcome`` runs one attack named in the profile and returns its
results.json entry plus the state that defenses against it need (saved in the stage folder by the spine).
A defense handler ``fn(ctx, spec, defense_spec_components, outcome) -> dict`` evaluates one defense against one
attack outcome and returns its results.json entry. Handlers are registered by (defense kind, attack category);
modules named ``safedl.assess.attack_*`` and ``safedl.assess.defend_*`` are imported automatically.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

ATTACK_HANDLERS: dict[str, Callable] = {}
DEFENSE_HANDLERS: dict[tuple[str, str], Callable] = {}
_loaded = False


@dataclass
class AttackOutcome:
    """What an attack stage produced.

    ``entry``: the results.json attack entry (name, category, params, metrics, time_s, artifacts ...).
    ``state``: objects later stages need (e.g. the PoisonedDataset, the poisoned model's state_dict, the attack
    object for ``apply_trigger``, the adversarial examples); saved with ``torch.save`` in the stage folder.
    """

    entry: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvasionState:
    """What an evasion attack stage leaves for the defenses evaluated against it (typed view of its saved state):
    the evaluation images and labels, the adversarial examples made on the undefended baseline, the targets of a
    targeted attack, and the attack's profile entry (to re-run it adaptively on a defended system)."""

    x: torch.Tensor
    y: torch.Tensor
    x_adv: torch.Tensor
    target: torch.Tensor | None
    spec: dict[str, Any]

    def to_state(self) -> dict[str, Any]:
        return {"x": self.x.cpu(), "y": self.y.cpu(), "x_adv": self.x_adv.cpu(),
                "target": None if self.target is None else self.target.cpu(), "spec": dict(self.spec)}

    @classmethod
    def from_state(cls, state: Any, device: torch.device | str = "cpu") -> "EvasionState":
        target = state["target"]
        return cls(x=state["x"].to(device), y=state["y"].to(device), x_adv=state["x_adv"].to(device),
                   target=None if target is None else target.to(device), spec=dict(state["spec"]))


def attack_handler(category: str) -> Callable:
    def deco(fn: Callable) -> Callable:
        ATTACK_HANDLERS[category] = fn
        return fn

    return deco


def defense_handler(kind: str, *categories: str) -> Callable:
    """Register ``fn`` as the evaluator of defenses of ``kind`` against attacks of ``categories``."""

    def deco(fn: Callable) -> Callable:
        for cat in categories:
            DEFENSE_HANDLERS[(kind, cat)] = fn
        return fn

    return deco


def load_handlers() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import safedl.assess as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith(("attack_", "defend_")):
            importlib.import_module(f"safedl.assess.{info.name}")


def get_attack_handler(category: str) -> Callable:
    load_handlers()
    return ATTACK_HANDLERS[category]


def get_defense_handler(kind: str, category: str) -> Callable | None:
    load_handlers()
    return DEFENSE_HANDLERS.get((kind, category))
