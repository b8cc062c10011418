"""Service-level objectives for a model release, read by the release gate.

An SLO file names SLIs (service-level indicators, as in Google's SRE book, ch. 4) and their targets::

    # slo.yaml
    interval: lower              # value | lower (conservative end of the 95% interval) | upper
    objectives:
      - sli: attack_success_rate
        target: 0.10
      - sli: clean_accuracy_delta
        target: 0.02

Each SLI has a fixed direction and becomes one release-gate threshold (``SLI_TO_GATE``) before the gate runs, so the
gate, the JUnit file and gate.json report it like any profile threshold. An SLI that this installation's gate cannot
check is refused with the list of those it can.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from safedl.errors import ProfileError

SLI_TO_GATE: dict[str, str] = {
    "clean_accuracy": "min_clean_accuracy",                # the baseline's accuracy on clean test images
    "robust_accuracy": "min_robust_accuracy",              # every evasion attack, undefended model
    "adaptive_robust_accuracy": "min_adaptive_robust_accuracy",  # every evasion defense, adaptive attack
    "attack_success_rate": "max_attack_success_rate",      # every attack, undefended
    "attack_success_rate_after": "max_attack_success_rate_after",  # every poisoning/backdoor defense
    "clean_accuracy_delta": "max_clean_accuracy_drop",     # clean accuracy lost to an evasion defense
    "detection_recall": "min_detection_recall",            # detectors: TPR on successful adversarial examples
    "residual_risk": "max_risk",                           # the risk level with the best defenses in place
}


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sli: str
    target: Any
    description: Optional[str] = None


class SLOFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    interval: Optional[Literal["value", "lower", "upper"]] = None
    objectives: list[Objective] = Field(min_length=1)


def supported_slis() -> list[str]:
    """The SLIs whose gate threshold exists in this installation."""
    from safedl.profile import GateSpec

    return [s for s, g in SLI_TO_GATE.items() if g in GateSpec.model_fields]


def load_slo(path: str | Path) -> SLOFile:
    p = Path(path)
    if not p.is_file():
        raise ProfileError(f"{p}: SLO file not found", errors=[("(file)", "not found")], path=str(p))
    try:
        slo = SLOFile.model_validate(yaml.safe_load(p.read_text(encoding="utf-8")))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{p}: not a YAML SLO file ({exc})", errors=[("(file)", str(exc))], path=str(p)) from None
    except ValidationError as exc:
        errs = [(".".join(map(str, e["loc"])) or "(top level)", e["msg"]) for e in exc.errors()]
        raise ProfileError(f"{p}: " + "; ".join(f"{loc}: {msg}" for loc, msg in errs), errors=errs,
                           path=str(p)) from None
    bad = [(f"objectives[{i}].sli", o.sli) for i, o in enumerate(slo.objectives) if o.sli not in supported_slis()]
    if bad:
        raise ProfileError(f"{p}: unknown SLI {', '.join(repr(s) for _, s in bad)}; this gate checks: "
                           f"{', '.join(supported_slis())}", errors=[(loc, f"unknown SLI {s!r}") for loc, s in bad],
                           path=str(p))
    return slo


def gate_with_slo(gate: Any, slo: SLOFile, *, source: str = "<slo>") -> Any:
    """A copy of the profile's GateSpec with every objective as a threshold (the SLO file wins where both set one)."""
    from safedl.profile import GateSpec

    values = gate.model_dump()
    for o in slo.objectives:
        values[SLI_TO_GATE[o.sli]] = o.target
    if slo.interval is not None:
        values["use_interval"] = slo.interval
    try:
        return GateSpec.model_validate(values)
    except ValidationError as exc:
        sli_of = {g: s for s, g in SLI_TO_GATE.items()}
        errs = [(f"sli {sli_of.get(str(e['loc'][0]), e['loc'][0])}", f"{e['msg']} (got {e.get('input')!r})")
                for e in exc.errors()]
        raise ProfileError(f"{source}: " + "; ".join(f"target of {loc}: {msg}" for loc, msg in errs),
                           errors=errs, path=source) from None


def profile_with_slo(profile: Any, path: str | Path) -> Any:
    """The profile with the SLO file's objectives in ``evaluation.gate``."""
    gate = gate_with_slo(profile.evaluation.gate, load_slo(path), source=str(path))
    evaluation = profile.evaluation.model_copy(update={"gate": gate})
    return profile.model_copy(update={"evaluation": evaluation})
