"""Component registries, one per kind (timm-style): ``@register(kind, name)``, ``create``, ``names``, ``describe``.

Components are discovered by importing every module under ``safedl.attacks`` and ``safedl.defenses``, so a new
component only needs its own module and decorator. A profile names components only by registry name.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from safedl.errors import ConfigError, UnknownComponentError

#: Every kind of component, in pipeline order.
KINDS: tuple[str, ...] = (
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
ATTACK_KINDS = ("evasion", "poisoning", "backdoor", "extraction")
DEFENSE_KINDS = tuple(k for k in KINDS if k not in ATTACK_KINDS)

_REGISTRY: dict[str, dict[str, type]] = {k: {} for k in KINDS}
_PACKAGES = ("safedl.attacks", "safedl.defenses")
_loaded = False
#: modules that failed to import (name -> error); a test asserts this stays empty
import_errors: dict[str, str] = {}
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


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for pkg_name in _PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg_name + ".", onerror=_record_error):
            try:
                importlib.import_module(info.name)
            except Exception as exc:  # one broken plug-in must not take down every other component
                _record_error(info.name, exc)


def _record_error(name: str, exc: BaseException | None = None) -> None:
    import_errors[name] = f"{type(exc).__name__}: {exc}" if exc else "cannot import"
    log.warning("component module %s failed to import (%s); its components are unavailable", name,
                import_errors[name])


def _check_kind(kind: str) -> None:
    if kind not in _REGISTRY:
        raise UnknownComponentError(f"unknown component kind {kind!r}; kinds are: {', '.join(KINDS)}")


def names(kind: str) -> list[str]:
    """Registered names of one kind, sorted."""
    _check_kind(kind)
    _load_all()
    return sorted(_REGISTRY[kind])


def get(kind: str, name: str) -> type:
    """The class registered as ``kind``/``name``; an unknown name lists the valid ones."""
    _check_kind(kind)
    _load_all()
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        valid = ", ".join(sorted(_REGISTRY[kind])) or "(none)"
        raise UnknownComponentError(f"unknown {kind} {name!r}; valid {kind} names are: {valid}") from None


def find_kind(name: str, kinds: tuple[str, ...] = KINDS) -> str:
    """The kind under which ``name`` is registered (searching ``kinds``)."""
    _load_all()
    hits = [k for k in kinds if name in _REGISTRY[k]]
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
    """The keyword parameters of a component's constructor, with their types and defaults."""
    cls = get(kind, name)
    out = []
    for p in inspect.signature(cls.__init__).parameters.values():
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
        obj = cls(**kwargs)
    except TypeError as exc:  # a missing required parameter
        raise ConfigError(f"{kind} {name!r}: {exc}") from None
    # the exact constructor arguments, so a deployed bundle can rebuild the component without pickling it
    object.__setattr__(obj, "_registry_params", dict(kwargs))
    return obj


def creation_params(obj: Any) -> dict[str, Any]:
    """The keyword arguments ``create`` built ``obj`` with; raises ConfigError for objects made otherwise."""
    try:
        return dict(obj._registry_params)
    except AttributeError:
        raise ConfigError(f"{type(obj).__name__} was not created with safedl.registry.create, so its constructor "
                          "parameters are unknown") from None


def summary(cls: type) -> str:
    """The first paragraph of a component's docstring on one line (whole sentences, never cut mid-sentence)."""
    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.split("\n\n")[0].split())
