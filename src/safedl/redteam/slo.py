"""The red team's SLOs (``--slo FILE``, YAML) and their check.

A check breaks only when the measurement is past its limit with 95% confidence (one-sided Wilson bound): robust
accuracy's upper bound below the floor, backdoor ASR's lower bound above the ceiling (the decision rule of issue
25's rollout checks). The floor of an attack is ``min_robust_accuracy[attack]`` and, when the release measured that
attack, the release's value minus ``max_drop_from_release``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from safedl.errors import UserError
from safedl.redteam.outcome import AttackOutcome


class RedteamSLO(BaseModel):
    """``min_robust_accuracy``: floor per attack name; ``max_drop_from_release``: points (0..1) below the
    release's measured robust accuracy; ``max_backdoor_asr``: ceiling of the replayed backdoor's success rate."""

    model_config = ConfigDict(extra="forbid")
    min_robust_accuracy: dict[str, float] = Field(default_factory=dict)
    max_drop_from_release: float | None = Field(0.02, ge=0, le=1)
    max_backdoor_asr: float | None = Field(0.05, ge=0, le=1)


@dataclass(frozen=True)
class Breach:
    check: str
    attack: str
    bound: float
    limit: float

    def __str__(self) -> str:
        side = "upper" if self.check != "max_backdoor_asr" else "lower"
        return f"{self.attack}: {self.check} broken (one-sided 95% {side} bound {self.bound:.4f} vs limit {self.limit:.4f})"


def load_slo(path: Path | None) -> RedteamSLO:
    """The SLO file at ``path`` (the defaults without one); UserError naming the file and key on a bad one."""
    if path is None:
        return RedteamSLO()
    if not path.is_file():
        raise UserError(f"--slo {path}: not found")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return RedteamSLO.model_validate(doc)
    except yaml.YAMLError as exc:
        raise UserError(f"--slo {path}: not valid YAML ({exc})") from None
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e["loc"])
        raise UserError(f"--slo {path}: {where}: {e['msg']} (keys: min_robust_accuracy, max_drop_from_release, "
                        "max_backdoor_asr)") from None


def check_slo(slo: RedteamSLO, outcomes: list[AttackOutcome], release: dict[str, float]) -> list[Breach]:
    """Every broken SLO; ``release`` maps attack name to the release's measured robust accuracy."""
    out = []
    for o in outcomes:
        if o.n == 0:
            continue
        lo, hi = o.one_sided95
        if o.kind == "backdoor":
            if slo.max_backdoor_asr is not None and lo > slo.max_backdoor_asr:
                out.append(Breach("max_backdoor_asr", o.attack, lo, slo.max_backdoor_asr))
            continue
        floor = slo.min_robust_accuracy.get(o.attack)
        if floor is not None and hi < floor:
            out.append(Breach("min_robust_accuracy", o.attack, hi, floor))
        if slo.max_drop_from_release is not None and o.attack in release:
            limit = release[o.attack] - slo.max_drop_from_release
            if hi < limit:
                out.append(Breach("max_drop_from_release", o.attack, hi, limit))
    return out
