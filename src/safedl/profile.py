"""The threat profile: a pydantic schema (extra keys forbidden) loaded from YAML, validated all at once."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from safedl.errors import ProfileError
from safedl.models.train import TrainRecipe


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ThreatModel(_Strict):
    """Who the attacker is and what they can reach."""

    model_access: Literal["white-box", "gray-box", "black-box"] = "white-box"
    attack_goal: Literal["untargeted", "targeted", "availability", "backdoor", "any"] = "any"
    deployment_scenario: Literal["cloud_api", "edge_device", "internal", "research"] = "cloud_api"
    data_sensitivity: Literal["low", "medium", "high"] = "medium"
    training_data_source: Literal["trusted", "curated", "crowdsourced", "scraped", "third_party"] = "curated"
    interface_exposed: Literal["scores", "labels", "none"] = Field("scores", description="what a query returns to users")


class DatasetSpec(_Strict):
    """A built-in data set by name, or files by format and path."""

    name: str = Field("mnist5k", description="built-in: mnist5k | digits; or a label for file data")
    format: Literal["builtin", "npz", "image_folder", "idx", "cifar10"] = "builtin"
    path: Optional[str] = Field(None, description="file or folder for npz / image_folder / cifar10; images file for idx")
    labels_path: Optional[str] = Field(None, description="labels file for idx")
    image_size: Optional[int] = Field(None, ge=4, le=1024, description="resize image_folder images to this square size")
    test_fraction: float = Field(0.2, gt=0, lt=1)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    split_seed: Optional[int] = Field(None, ge=0, description="seed of the train/val/test split (default: the "
                                      "profile's seed); fix it to compare model versions on the same test images")
    limit: Optional[int] = Field(None, ge=10, description="use only the first N samples (quick runs)")

    @model_validator(mode="after")
    def _check(self) -> "DatasetSpec":
        if self.format == "builtin":
            from safedl.data.builtin import BUILTIN

            if self.name not in BUILTIN:
                raise ValueError(f"unknown built-in data set {self.name!r}; built-in data sets are: {', '.join(BUILTIN)}")
        elif not self.path:
            raise ValueError(f"format {self.format!r} needs 'path'")
        if self.format == "idx" and not self.labels_path:
            raise ValueError("format 'idx' needs 'labels_path'")
        if self.test_fraction + self.val_fraction >= 0.9:
            raise ValueError("test_fraction + val_fraction must leave at least 10% for training")
        return self


class ModelSpec(_Strict):
    """A zoo architecture, a user entry point ``module:function`` or a TorchScript file; optional checkpoint."""

    arch: Optional[str] = Field("small_cnn", description="zoo model name")
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the zoo model / entry point")
    entry_point: Optional[str] = Field(None, description="'package.module:function' returning an nn.Module")
    torchscript: Optional[str] = Field(None, description="path of a TorchScript model file")
    checkpoint: Optional[str] = Field(None, description="load these weights instead of training the baseline")

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        if self.entry_point or self.torchscript:
            self.arch = None
        if self.arch is not None:
            from safedl.models.zoo import model_names

            if self.arch not in model_names():
                raise ValueError(f"unknown model {self.arch!r}; zoo models are: {', '.join(model_names())}")
        if self.entry_point and self.torchscript:
            raise ValueError("give either entry_point or torchscript, not both")
        return self


class ComponentSpec(_Strict):
    """One component by registry name, with its constructor parameters."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class AttackSpec(ComponentSpec):
    """An attack; ``id`` tells two runs of the same attack apart (defaults to the name)."""

    id: Optional[str] = None
    targeted: bool = Field(False, description="evasion only: aim each sample at a target class")
    target_class: Optional[int] = Field(None, ge=0, description="targeted evasion: this class (else a random other class)")

    @property
    def key(self) -> str:
        return self.id or self.name


class AttacksSection(_Strict):
    evasion: list[AttackSpec] = Field(default_factory=list)
    poisoning: list[AttackSpec] = Field(default_factory=list)
    backdoor: list[AttackSpec] = Field(default_factory=list)

    def all(self) -> list[tuple[str, AttackSpec]]:
        return [(cat, a) for cat in ("evasion", "poisoning", "backdoor") for a in getattr(self, cat)]


class DefenseSpec(_Strict):
    """A defense by registry name, or a layered ``pipeline`` of defenses, evaluated against named attacks."""

    name: Optional[str] = None
    params: dict[str, Any] = Field(default_factory=dict)
    pipeline: Optional[list[ComponentSpec]] = Field(None, description="layered defense, input side first")
    against: list[str] = Field(default_factory=lambda: ["all"], description="attack ids, or 'all' of the matching kind")
    id: Optional[str] = None

    @model_validator(mode="after")
    def _check(self) -> "DefenseSpec":
        if (self.name is None) == (self.pipeline is None):
            raise ValueError("a defense needs exactly one of 'name' or 'pipeline'")
        return self

    @property
    def key(self) -> str:
        if self.id:
            return self.id
        return self.name if self.name else "+".join(c.name for c in self.pipeline or [])


class GateSpec(_Strict):
    """Release-gate thresholds; a run fails the gate if any is violated (unset ones are not checked)."""

    min_clean_accuracy: Optional[float] = Field(None, ge=0, le=1)
    min_robust_accuracy: Optional[float] = Field(None, ge=0, le=1, description="for every evasion attack")
    max_attack_success_rate: Optional[float] = Field(None, ge=0, le=1, description="for every attack")
    max_attack_success_rate_after: Optional[float] = Field(None, ge=0, le=1, description="for every defense")
    max_risk: Optional[Literal["low", "medium", "high", "critical"]] = None
    use_interval: Literal["value", "lower", "upper"] = Field(
        "value", description="compare the point estimate, or the conservative end of the 95% interval")


class EvaluationSpec(_Strict):
    n_eval: int = Field(1000, ge=1, description="test images used for evasion attacks")
    batch_size: int = Field(250, ge=1)
    n_examples: int = Field(8, ge=0, le=64, description="example images saved per attack")
    gate: GateSpec = Field(default_factory=GateSpec)


class OutputSpec(_Strict):
    dir: str = Field("runs", description="parent folder of run directories")
    html: bool = True
    figures: bool = True


class Profile(_Strict):
    """A whole threat profile."""

    name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0)
    threat_model: ThreatModel = Field(default_factory=ThreatModel)
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    training: TrainRecipe = Field(default_factory=TrainRecipe)
    attacks: AttacksSection = Field(default_factory=AttacksSection)
    defenses: list[DefenseSpec] = Field(default_factory=list)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _component_errors(profile: Profile) -> list[tuple[str, str]]:
    """Check registry names, parameters and the threat model by building every component once."""
    from safedl import registry
    from safedl.errors import UserError

    errors: list[tuple[str, str]] = []
    ids: dict[str, str] = {}
    built: dict[tuple[str, int], Any] = {}
    for cat in ("evasion", "poisoning", "backdoor"):
        for i, spec in enumerate(getattr(profile.attacks, cat)):
            where = f"attacks.{cat}[{i}]"
            if spec.key in ids:
                errors.append((f"{where}.id", f"attack id {spec.key!r} is used twice; give each attack a distinct 'id'"))
            ids[spec.key] = cat
            try:
                attack = registry.create(cat, spec.name, **spec.params)
            except UserError as exc:
                errors.append((f"{where}.name" if "unknown" in str(exc) else f"{where}.params", str(exc)))
                continue
            built[(cat, i)] = attack
    from safedl.threat import threat_errors

    errors += threat_errors(profile, built)
    from safedl.registry import DEFENSE_KINDS

    for i, d in enumerate(profile.defenses):
        where = f"defenses[{i}]"
        parts = [(d.name, d.params, where)] if d.name else [(c.name, c.params, f"{where}.pipeline[{j}]")
                                                           for j, c in enumerate(d.pipeline or [])]
        for name, params, w in parts:
            try:
                kind = registry.find_kind(name, DEFENSE_KINDS)
                registry.create(kind, name, **params)
            except UserError as exc:
                errors.append((f"{w}.name" if "unknown" in str(exc) else f"{w}.params", str(exc)))
        for a in d.against:
            if a != "all" and a not in ids:
                errors.append((f"{where}.against", f"no attack with id {a!r}; attack ids are: {', '.join(ids) or '(none)'}"))
    return errors


def _salvaged_component_errors(data: dict, bad_sections: set) -> list[tuple[str, str]]:
    """Component errors of the sections that passed the schema, so one pass reports every error.

    The sections with schema errors are replaced by their defaults; checks that depend on a replaced section (the
    threat model for attack access, the attack ids for ``against``) are left out rather than reported wrongly.
    """
    salvaged = {k: v for k, v in data.items() if k not in bad_sections}
    try:
        profile = Profile.model_validate(salvaged)
    except ValidationError:
        return []
    errors = _component_errors(profile)
    if "threat_model" in bad_sections:
        errors = [(loc, msg) for loc, msg in errors if "threat_model" not in msg]
    if "attacks" in bad_sections:
        errors = [(loc, msg) for loc, msg in errors if not loc.endswith(".against")]
    return errors


def parse_profile(data: Any, *, source: str = "<profile>") -> Profile:
    """Validate a profile mapping; every problem is reported at once in one ProfileError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: a profile must be a YAML mapping, got {type(data).__name__}",
                           errors=[("(top level)", "not a mapping")], path=source)
    try:
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        errors = []
        for e in exc.errors():
            msg = e["msg"].removeprefix("Value error, ")
            value = e.get("input")
            shown = "" if isinstance(value, dict) or e["type"] == "missing" else f" (got {value!r})"
            errors.append((_loc(e["loc"]), msg + shown))
        errors += _salvaged_component_errors(data, {e["loc"][0] for e in exc.errors() if e["loc"]})
        raise ProfileError(_format(source, errors), errors=errors, path=source) from None
    errors = _component_errors(profile)
    if errors:
        raise ProfileError(_format(source, errors), errors=errors, path=source)
    return profile


def _format(source: str, errors: list[tuple[str, str]]) -> str:
    lines = [f"{source}: {len(errors)} error{'s' if len(errors) != 1 else ''} in the threat profile"]
    lines += [f"  {loc}: {msg}" for loc, msg in errors]
    return "\n".join(lines)


def load_profile(path: str | Path) -> Profile:
    """Read and validate a YAML profile file."""
    p = Path(path)
    if not p.is_file():
        raise ProfileError(f"{p}: profile file not found", errors=[("(file)", "not found")], path=str(p))
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ProfileError(f"{p}: not valid YAML ({exc})", errors=[("(file)", str(exc))], path=str(p)) from None
    return parse_profile(data, source=str(p))
