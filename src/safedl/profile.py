"""The threat profile: a pydantic schema (extra keys forbidden) loaded from YAML, validated all at once."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import Field, ValidationError, model_validator

from safedl.errors import ProfileError
from safedl.models.train import TrainRecipe
from safedl.param_aliases import resolve_aliases
from safedl.profile_inputs import CanarySpec, DatasetSpec, ModelSpec, Normalization, StrictModel, ThreatModel
from safedl.sweeps import check_eps_list, expand_against, expand_attacks, source_indices

__all__ = ["DatasetSpec", "ModelSpec", "Normalization", "Profile", "ThreatModel", "load_profile", "parse_profile"]


_Strict = StrictModel


class ComponentSpec(_Strict):
    """One component by registry name, with its constructor parameters."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _aliases(self) -> "ComponentSpec":
        self.params = resolve_aliases(self.name, self.params)  # names users know (safedl.param_aliases)
        return self


class AttackSpec(ComponentSpec):
    """An attack; ``id`` tells two runs of the same attack apart (defaults to the name)."""

    id: Optional[str] = None
    targeted: bool = Field(False, description="evasion only: aim each sample at a target class")
    target_class: Optional[int] = Field(None, ge=0, description="targeted evasion: this class (else a random other class)")

    @property
    def key(self) -> str:
        return self.id or self.name

    @model_validator(mode="after")
    def _check_sweep(self) -> "AttackSpec":
        """``params.eps`` may be a list: an eps sweep (see :mod:`safedl.sweeps`)."""
        check_eps_list(self.params.get("eps"))
        return self


class AttacksSection(_Strict):
    evasion: list[AttackSpec] = Field(default_factory=list)
    poisoning: list[AttackSpec] = Field(default_factory=list)
    backdoor: list[AttackSpec] = Field(default_factory=list)
    extraction: list[AttackSpec] = Field(default_factory=list, description="model stealing through the query interface")

    def all(self) -> list[tuple[str, AttackSpec]]:
        return [(cat, a) for cat in ("evasion", "poisoning", "backdoor", "extraction") for a in getattr(self, cat)]


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
        if self.name is not None:
            self.params = resolve_aliases(self.name, self.params)  # names users know (safedl.param_aliases)
        return self

    @property
    def key(self) -> str:
        if self.id:
            return self.id
        return self.name if self.name else "+".join(c.name for c in self.pipeline or [])


class TrustedDataSpec(_Strict):
    """The trusted clean set poisoning defenses rely on (an assumption: say where it comes from).

    ``validation`` (default): the validation split, clean in the simulation because only the training split is
    poisoned (a real user's data may be poisoned before splitting: with ``threat_model.poison_stage: before_split``
    the default is ``none`` and ``validation`` is refused); ``path``: an ``.npz`` file of images the user
    vouches for; ``none``: no trusted data (defenses that need it are refused at validation). ``size`` keeps only the
    first ``size`` images (e.g. 100: a small hand-checked set)."""

    source: Literal["validation", "path", "none"] = "validation"
    path: Optional[str] = Field(None, description="the trusted .npz file (source: path)")
    size: Optional[int] = Field(None, ge=1, description="use only the first SIZE trusted images")

    @model_validator(mode="after")
    def _check(self) -> "TrustedDataSpec":
        if (self.source == "path") != (self.path is not None):
            raise ValueError("trusted_clean_set.path is required with source 'path' and allowed only with it")
        return self


class DataProvenanceSpec(_Strict):
    """Where the training data come from, for provenance defenses (Baracaldo et al. 2017): ``contributors`` named
    contributors, each sample tagged with one; the clean samples are spread evenly over them. ``poison_spread``:
    ``attacker`` (every poison comes from contributor ``attacker``, 0-based: the one the attacker controls) or
    ``uniform`` (poison spread evenly over all contributors, e.g. a compromised collection step: no contributor
    stands out)."""

    contributors: int = Field(5, ge=2, le=1000, description="number of named data contributors (>= 2)")
    attacker: int = Field(0, ge=0, description="0-based index of the contributor the attacker controls")
    poison_spread: Literal["attacker", "uniform"] = Field(
        "attacker", description="attacker: every poison from contributor ATTACKER; uniform: spread over all")

    @model_validator(mode="after")
    def _check(self) -> "DataProvenanceSpec":
        if self.attacker >= self.contributors:
            raise ValueError(f"data_provenance.attacker={self.attacker} is not a contributor: allowed 0..."
                             f"{self.contributors - 1} (data_provenance.contributors={self.contributors})")
        return self


class GateSpec(_Strict):
    """Release-gate thresholds. A run fails the gate if any set threshold is violated or applies to nothing in the run
    (e.g. ``min_robust_accuracy`` without an evasion attack); with no threshold set, the gate is "not configured"."""

    min_clean_accuracy: Optional[float] = Field(None, ge=0, le=1, description="the baseline's clean accuracy")
    min_robust_accuracy: Optional[float] = Field(None, ge=0, le=1, description="for every evasion attack")
    max_attack_success_rate: Optional[float] = Field(None, ge=0, le=1, description="for every attack")
    max_attack_success_rate_after: Optional[float] = Field(None, ge=0, le=1, description="for every poisoning defense")
    min_adaptive_robust_accuracy: Optional[float] = Field(
        None, ge=0, le=1, description="for every evasion defense: robust accuracy under the adaptive attack")
    max_clean_accuracy_drop: Optional[float] = Field(
        None, ge=0, le=1, description="for every evasion defense: undefended minus defended clean accuracy "
                                      "(point values, same evaluation images)")
    min_detection_recall: Optional[float] = Field(
        None, ge=0, le=1, description="for every defense with detectors: recall (TPR) on successful adversarial "
                                      "examples at the detectors' calibrated FPR (adaptive attack when run)")
    max_canary_changes: Optional[int] = Field(
        None, ge=0, description="canary records (canary_records) whose prediction may differ from the clean "
                                "baseline's: on every poisoning defense's model, or, with none, on every poisoned "
                                "model of a poisoning/backdoor attack")
    max_risk: Optional[Literal["low", "medium", "high", "critical"]] = None
    use_interval: Literal["value", "lower", "upper"] = Field(
        "value", description="compare the point estimate ('value'), the conservative end of the 95% interval "
                             "('lower': lower bound for minimums, upper bound for maximums) or the other end ('upper')")

    def thresholds(self) -> dict[str, Any]:
        """The thresholds that are set (name -> limit)."""
        return {k: v for k, v in self.model_dump().items() if k != "use_interval" and v is not None}


class StrongAdaptiveSpec(_Strict):
    """The strong adaptive suite every input- or model-changing evasion defense is also evaluated with (APGD-CE and
    APGD-DLR with restarts through BPDA/EOT, within the paired attack's norm and eps)."""

    enabled: bool = True
    steps: int = Field(100, ge=1, le=10000)
    restarts: int = Field(3, ge=1, le=100)
    eot_samples: int = Field(8, ge=1, le=256, description="EOT draws per step for randomized preprocessors")


class QueryDetectionSpec(_Strict):
    """How query detectors (stateful detection, PRADA) are evaluated offline: simulated API keys."""

    benign_keys: int = Field(10, ge=1, le=1000, description="benign keys per stream kind (in order, retry bursts)")
    benign_queries: int = Field(5000, ge=10, le=1_000_000, description="queries each benign key sends")
    attack_keys: int = Field(3, ge=1, le=100, description="keys that each run the attack")
    attack_budget: int = Field(2000, ge=1, le=1_000_000, description="queries each attack key may send")


class EvaluationSpec(_Strict):
    n_eval: int = Field(1000, ge=1, description="test images used for evasion attacks")
    batch_size: int = Field(250, ge=1)
    n_examples: int = Field(8, ge=0, le=64, description="example images saved per attack")
    gate: GateSpec = Field(default_factory=GateSpec)
    strong_adaptive: StrongAdaptiveSpec = Field(default_factory=StrongAdaptiveSpec)
    query_detection: QueryDetectionSpec = Field(default_factory=QueryDetectionSpec)


class OutputSpec(_Strict):
    dir: str = Field("runs", description="parent folder of run directories")
    html: bool = True
    figures: bool = True


class ExecutionSpec(_Strict):
    """Who runs the stage graph (``safedl run --executor`` etc. override these); results do not depend on it."""

    executor: Literal["serial", "process", "ray"] = Field("serial", description="serial | process (local pool) | ray")
    workers: Optional[int] = Field(None, ge=1, description="stages at a time (default: CPUs / threads_per_task)")
    threads_per_task: Optional[int] = Field(None, ge=1,
                                            description="torch threads per stage (default: CPUs / workers; Ray: 1)")
    ray_address: Optional[str] = Field(None, description="ray: an existing cluster ('auto', 'ray://host:10001'); "
                                                          "unset starts a local Ray")
    gpus_per_task: Optional[float] = Field(None, gt=0, le=1, description="ray with a cuda device: GPU share per stage "
                                                                          "(default 1/workers, else 1)")
    suite_shards: Optional[int] = Field(None, ge=1, description="stages the strong adaptive suite of a preprocessor "
                                        "defense is split into, by evaluation batch (same result; default: one per "
                                        "batch when stages run in parallel, else 1)")


class Profile(_Strict):
    """A whole threat profile."""

    name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0)
    baseline_only: bool = Field(False, description="allow a profile without attacks: train and measure the baseline "
                                                   "only (the report and gate say that nothing was attacked)")
    threat_model: ThreatModel = Field(default_factory=ThreatModel)
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    training: TrainRecipe = Field(default_factory=TrainRecipe)
    attacks: AttacksSection = Field(default_factory=AttacksSection)
    defenses: list[DefenseSpec] = Field(default_factory=list)
    trusted_clean_set: TrustedDataSpec = Field(default_factory=TrustedDataSpec)
    data_provenance: DataProvenanceSpec = Field(default_factory=DataProvenanceSpec)
    canary_records: CanarySpec = Field(default_factory=CanarySpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)

    @property
    def split_args(self) -> dict[str, Any]:
        """The keyword arguments of ``stratified_split`` for this profile's data: before-split poisoning carves the
        test split as the clean hold-out (``dataset.holdout_fraction``), otherwise ``dataset.test_fraction``."""
        ds = self.dataset
        test = ds.holdout_fraction if self.threat_model.poison_stage == "before_split" else ds.test_fraction
        return {"test_fraction": test, "val_fraction": ds.val_fraction,
                "seed": self.seed if ds.split_seed is None else ds.split_seed}

    @model_validator(mode="after")
    def _expand_sweeps(self) -> "Profile":
        """Each eps sweep becomes one attack per value (``<id>@<eps>``); ``against: [<id>]`` covers them all."""
        groups: dict[str, list[str]] = {}
        for cat in ("evasion", "poisoning", "backdoor", "extraction"):
            expanded, found = expand_attacks(getattr(self.attacks, cat))
            setattr(self.attacks, cat, expanded)
            groups.update(found)
        for d in self.defenses:
            d.against = expand_against(d.against, groups)
        return self

    @model_validator(mode="after")
    def _default_trusted(self) -> "Profile":
        """Data poisoned before splitting leave no clean split: the trusted set defaults to none."""
        if self.threat_model.poison_stage == "before_split" and "source" not in self.trusted_clean_set.model_fields_set:
            self.trusted_clean_set.source = "none"
        return self


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
    for cat in ("evasion", "poisoning", "backdoor", "extraction"):
        specs = getattr(profile.attacks, cat)
        for i, (spec, origin) in enumerate(zip(specs, source_indices(specs))):
            where = f"attacks.{cat}[{origin}]"
            if spec.key in ids:
                errors.append((f"{where}.id", f"attack id {spec.key!r} is used twice; give each attack a distinct 'id'"))
            ids[spec.key] = cat
            try:
                attack = registry.create(cat, spec.name, **spec.params)
            except UserError as exc:
                errors.append((f"{where}.name" if "unknown" in str(exc) else f"{where}.params", str(exc)))
                continue
            built[(cat, i)] = attack
            if cat == "extraction":  # query-only attacks: what the interface returns (evasion: safedl.threat)
                access = getattr(attack, "access", "white-box")
                tm = profile.threat_model
                if access == "scores" and tm.interface_exposed != "scores":
                    errors.append((f"{where}.name", f"{spec.name!r} needs scores but threat_model.interface_exposed is "
                                   f"{tm.interface_exposed!r}; use a decision-based (labels-only) attack"))
                if access == "labels" and tm.interface_exposed == "none":
                    errors.append((f"{where}.name", "threat_model.interface_exposed is 'none': no query attack is possible"))
    from safedl.threat import threat_errors

    errors += threat_errors(profile, built) + _poison_stage_errors(profile)
    if not ids and not profile.baseline_only:
        errors.append(("attacks", "the profile lists no attack, so the run would assess nothing; add at least one "
                       "under attacks.evasion, attacks.poisoning or attacks.backdoor (`safedl list` names them), or set "
                       "baseline_only: true to train and measure the baseline only"))
    if ids and profile.baseline_only:
        errors.append(("baseline_only", "is true but the profile lists attacks; remove baseline_only or the attacks"))
    from safedl.registry import DEFENSE_KINDS

    for i, d in enumerate(profile.defenses):
        where = f"defenses[{i}]"
        parts = [(d.name, d.params, where)] if d.name else [(c.name, c.params, f"{where}.pipeline[{j}]")
                                                           for j, c in enumerate(d.pipeline or [])]
        for name, params, w in parts:
            try:
                kind = registry.find_kind(name, DEFENSE_KINDS)
                comp = registry.create(kind, name, **params)
            except UserError as exc:
                errors.append((f"{w}.name" if "unknown" in str(exc) else f"{w}.params", str(exc)))
                continue
            if profile.trusted_clean_set.source == "none" and _needs_trusted(kind, comp, profile):
                errors.append((f"{w}.name", f"{name!r} needs a trusted clean set but trusted_clean_set.source is "
                               "'none'; name one (source: validation or path) or remove this defense"))
        for a in d.against:
            if a != "all" and a not in ids:
                errors.append((f"{where}.against", f"no attack with id {a!r}; attack ids are: {', '.join(ids) or '(none)'}"))
    return errors


def _poison_stage_errors(profile: Profile) -> list[tuple[str, str]]:
    """With poison before the split the validation split carries poison: it cannot be the trusted clean set."""
    if profile.threat_model.poison_stage != "before_split" or profile.trusted_clean_set.source != "validation":
        return []
    return [("trusted_clean_set.source", "'validation' is not clean when threat_model.poison_stage is "
             "'before_split' (the data were poisoned before the validation split was carved); allowed: 'none' "
             "(the default in that mode) or 'path' (images you vouch for)")]


def _needs_trusted(kind: str, comp: Any, profile: Profile) -> bool:
    """Whether a poisoning-side defense cannot work without trusted clean data (its protocol's ``trusted_data``;
    a detector against poisoning fits on clean images)."""
    if not (profile.attacks.poisoning or profile.attacks.backdoor):
        return False
    if kind == "detector":
        return True
    return kind in ("cleanser", "repair", "inspector") and comp.trusted_data == "required"


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
        errors = [(loc, msg) for loc, msg in errors if not loc.endswith(".against") and loc not in ("attacks", "baseline_only")]
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
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{p}: not a text (UTF-8 YAML) file; a threat profile is YAML text (`safedl init` writes "
                           f"one) ({exc.reason} at byte {exc.start})", errors=[("(file)", "not UTF-8 text")],
                           path=str(p)) from None
    except OSError as exc:
        raise ProfileError(f"{p}: cannot read the profile ({exc.strerror or exc})", errors=[("(file)", str(exc))],
                           path=str(p)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProfileError(f"{p}: not valid YAML ({exc})", errors=[("(file)", str(exc))], path=str(p)) from None
    return parse_profile(data, source=str(p))
