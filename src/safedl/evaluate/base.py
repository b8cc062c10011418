"""What a stage evaluator returns, and how evaluators register (registry kinds ``attack_evaluator`` and
``defense_evaluator``).

An attack evaluator ``fn(ctx, spec, attack) -> AttackOutcome`` runs one attack named in the profile and returns its
results.json entry plus the state that defenses against it need (saved in the stage folder by the run spine).
A defense evaluator ``fn(ctx, spec, components, outcome) -> dict`` evaluates one defense against one attack outcome
and returns its results.json entry. Attack evaluators are registered by attack category, defense evaluators by
``"<defense kind>/<attack category>"`` (``defense_evaluator_name``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from safedl import registry


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


def defense_evaluator_name(kind: str, category: str) -> str:
    """The registry name of the evaluator of ``kind`` defenses against ``category`` attacks."""
    return f"{kind}/{category}"


def attack_evaluator(category: str) -> Callable:
    """Register ``fn`` as the evaluator of attacks of ``category``."""
    return registry.register("attack_evaluator", category)


def defense_evaluator(kind: str, *categories: str) -> Callable:
    """Register ``fn`` as the evaluator of defenses of ``kind`` against attacks of ``categories``."""

    def deco(fn: Callable) -> Callable:
        for cat in categories:
            registry.register("defense_evaluator", defense_evaluator_name(kind, cat))(fn)
        return fn

    return deco
