"""The one registry, one table per kind (timm-style): ``@register(kind, name)``, ``create``, ``names``, ``get``.

Kinds are the attack and defense components a profile names, the zoo's models, the stage evaluators (what a run
does for an attack category, or a defense kind against an attack category) and the executors. Components are
discovered by explicit imports: each package listed in ``_PACKAGES`` names its component modules in
``COMPONENT_MODULES``, and a module that fails to import fails loudly (nothing is swallowed). A new component needs
its module, its decorator and its line in its package's ``COMPONENT_MODULES`` (a test checks none is missing).
"""
from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from safedl.errors import ConfigError, UnknownComponentError

#: The kinds of attack and defense component a profile names, in pipeline order.
COMPONENT_KINDS: tuple[str, ...] = (
    "evasion",        # attacks/evasion: __call__(model, x, y, *, target=None) -> x_adv
    "poisoning",      # attacks/poisoning: poison(train, *, generator) -> PoisonedDataset
    "backdoor",       # attacks/backdoor: poisoning + apply_trigger(x)
    "extraction",     # attacks/extraction: extract(oracle, pool, ...) -> ExtractionResult(surrogate, log)
    "preprocessor",   # defenses/preprocess: nn.Module with a `differentiable` flag
    "postprocessor",  # defenses/postprocess: logits -> logits / probabilities
    "detector",       # defenses/detect: fit(x_clean) -> self, score(x), predict(x)
    "trainer",        # defenses/train: fit(model, data) -> model
    "certifier",      # defenses/certify: certified prediction and radius
    "cleanser",       # defenses/cleanse: find_poison(...) -> DetectionResult
    "repair",         # defenses/repair: model -> model
    "inspector",      # defenses/inspect: diagnostics only
    "query_detector",  # defenses/query: observe(key, x) -> QueryVerdict, per API key (the service runs them online)
)
#: Every kind: the components, then the zoo's models, the stage evaluators and the executors.
KINDS: tuple[str, ...] = COMPONENT_KINDS + (
    "model",              # models/zoo: a network class built with (in_channels, num_classes, image_size, ...)
    "attack_evaluator",   # evaluate/attack_*: fn(ctx, spec, attack) -> AttackOutcome, named by attack category
    "defense_evaluator",  # evaluate/defend_*: fn(ctx, spec, components, outcome) -> entry, named "kind/category"
    "executor",           # executors: who runs the stage graph (serial, process, ray)
)
ATTACK_KINDS = ("evasion", "poisoning", "backdoor", "extraction")
DEFENSE_KINDS = tuple(k for k in COMPONENT_KINDS if k not in ATTACK_KINDS)

_REGISTRY: dict[str, dict[str, Any]] = {k: {} for k in KINDS}
#: the package whose ``COMPONENT_MODULES`` register each kind
_PACKAGES: dict[str, str] = {**{k: "safedl.attacks" for k in ATTACK_KINDS},
                             **{k: "safedl.defenses" for k in DEFENSE_KINDS},
                             "model": "safedl.models", "attack_evaluator": "safedl.evaluate",
                             "defense_evaluator": "safedl.evaluate", "executor": "safedl.executors"}
_loaded: set[str] = set()
#: registry-name prefixes served by an integration module (``component_class(kind, name)``, ``kind_of(name, kinds)``):
#: ``art:ClassName`` wraps an ART class on first use (imported lazily, so safedl runs without ART)
_PREFIXES: dict[str, str] = {"art:": "safedl.integrations.art.resolve"}
log = logging.getLogger(__name__)
T = TypeVar("T")


def register(kind: str, name: str) -> Callable[[T], T]:
    """Class decorator that registers a component under ``kind``/``name``."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")

    def deco(cls: T) -> T:
        existing = _REGISTRY[kind].get(name)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"{kind} {name!r} is registered twice ({existing.__module__}, {cls.__module__})")
        _REGISTRY[kind][name] = cls
        cls.registry_kind = kind  # type: ignore[attr-defined]
        cls.registry_name = name  # type: ignore[attr-defined]
        return cls

    return deco


def component_modules(package: str) -> list[str]:
    """The modules ``package`` lists in ``COMPONENT_MODULES`` (full dotted names)."""
    pkg = importlib.import_module(package)
    return [f"{package}.{m}" for m in pkg.COMPONENT_MODULES]


def _load(kinds: tuple[str, ...] | list[str]) -> None:
    """Import the component modules that register ``kinds`` (once); an import error propagates."""
    for pkg_name in dict.fromkeys(_PACKAGES[k] for k in kinds):
        if pkg_name in _loaded:
            continue
        for module in component_modules(pkg_name):
            importlib.import_module(module)
        _loaded.add(pkg_name)


def _load_all() -> None:
    _load(KINDS)


def _integration(name: str) -> Any:
    """The integration module serving a prefixed name such as ``art:ProjectedGradientDescent`` (None otherwise)."""
    for prefix, module in _PREFIXES.items():
        if isinstance(name, str) and name.startswith(prefix):
            return importlib.import_module(module)
    return None


def _check_kind(kind: str) -> None:
    if kind not in _REGISTRY:
        raise UnknownComponentError(f"unknown component kind {kind!r}; kinds are: {', '.join(KINDS)}")


def names(kind: str) -> list[str]:
    """Registered names of one kind, sorted."""
    _check_kind(kind)
    _load((kind,))
    return sorted(_REGISTRY[kind])


def qualified_kind(name: str) -> tuple[str | None, str]:
    """Split a kind-qualified name (``certifier:ibp``: the certifier, where ``ibp`` alone is the trainer) into
    (kind, bare name); (None, name) when ``name`` has no component-kind prefix."""
    head, sep, rest = name.partition(":") if isinstance(name, str) else ("", "", name)
    return (head, rest) if sep and head in COMPONENT_KINDS else (None, name)


def get(kind: str, name: str) -> type:
    """The class registered as ``kind``/``name`` (``name`` may carry its own kind as ``kind:name``); an unknown name
    lists the valid ones."""
    _check_kind(kind)
    _load((kind,))
    qual, bare = qualified_kind(name)
    if qual is not None:
        if qual != kind:
            raise UnknownComponentError(f"{name!r} names a {qual}, not a {kind}")
        name = bare
    integration = None if name in _REGISTRY[kind] else _integration(name)
    if integration is not None:
        return integration.component_class(kind, name)
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        valid = ", ".join(sorted(_REGISTRY[kind])) or "(none)"
        raise UnknownComponentError(f"unknown {kind} {name!r}; valid {kind} names are: {valid}") from None


def find_kind(name: str, kinds: tuple[str, ...] = COMPONENT_KINDS) -> str:
    """The kind under which ``name`` is registered (searching ``kinds``, in order: a name registered under two kinds
    is the first one's; ``kind:name`` picks the other, e.g. ``certifier:ibp``)."""
    _load(kinds)
    qual, bare = qualified_kind(name)
    if qual is not None:
        if qual not in kinds or bare not in _REGISTRY[qual]:
            valid = ", ".join(f"{qual}:{n}" for n in sorted(_REGISTRY.get(qual, {}))) if qual in kinds else "(none here)"
            raise UnknownComponentError(f"unknown component {name!r}; valid {qual} names are: {valid}")
        return qual
    hits = [k for k in kinds if name in _REGISTRY[k]]
    integration = None if hits else _integration(name)
    if integration is not None:
        return integration.kind_of(name, kinds)
    if not hits:
        valid = ", ".join(sorted({n for k in kinds for n in _REGISTRY[k]}))
        raise UnknownComponentError(f"unknown component {name!r}; valid names are: {valid}")
    return hits[0]


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: Any
    required: bool


def params(kind: str, name: str) -> list[Param]:
    """The keyword parameters of a component's constructor (a registered function: its keyword-only parameters),
    with their types and defaults."""
    cls = get(kind, name)
    out = []
    sig = inspect.signature(cls.__init__ if isinstance(cls, type) else cls)
    for p in sig.parameters.values():
        if not isinstance(cls, type) and p.kind is not p.KEYWORD_ONLY:
            continue
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = p.annotation
        tname = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
        required = p.default is inspect.Parameter.empty
        out.append(Param(p.name, "" if ann is inspect.Parameter.empty else str(tname), None if required else p.default, required))
    return out


def create(kind: str, name: str, /, **kwargs: Any) -> Any:
    """Build a component by registry name; unknown parameters get one clear error listing the valid ones."""
    cls = get(kind, name)
    valid = {p.name for p in params(kind, name)}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ConfigError(
            f"{kind} {name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"its parameters are: {', '.join(sorted(valid)) or '(none)'}"
        )
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a missing required parameter
        raise ConfigError(f"{kind} {name!r}: {exc}") from None


def _canonical(value: Any) -> Any:
    """``value`` with tuples as lists, so a stored list compares equal to a tuple default."""
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    return value


def creation_params(obj: Any) -> dict[str, Any]:
    """The constructor arguments of a registered component that differ from their defaults, read back from the
    attributes of the same names (scikit-learn's ``get_params`` convention: constructors store their arguments
    unchanged), so a deployed bundle can rebuild the component without pickling it."""
    cls = type(obj)
    kind, name = getattr(cls, "registry_kind", None), getattr(cls, "registry_name", None)
    if kind is None or name is None:
        raise ConfigError(f"{cls.__name__} is not a registered component, so its constructor parameters are unknown")
    out = {}
    for p in params(kind, name):
        if not hasattr(obj, p.name):
            raise ConfigError(f"{kind} {name!r} does not store its constructor argument {p.name!r} as an attribute")
        value = getattr(obj, p.name)
        if p.required or _canonical(value) != _canonical(p.default):
            out[p.name] = value
    return out


def summary(cls: type) -> str:
    """The first paragraph of a component's docstring on one line (whole sentences, never cut mid-sentence)."""
    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.split("\n\n")[0].split())
