"""Registry-wide checks (timm style): every component module imports, every component is documented and constructible."""
from __future__ import annotations

import pytest

from safedl import registry


PACKAGES = ("safedl.attacks", "safedl.defenses", "safedl.models", "safedl.evaluate", "safedl.executors")


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_that_registers_is_listed_for_discovery(package):
    """Discovery is by explicit import: a module with a ``register`` decorator that its package's
    COMPONENT_MODULES forgets would silently vanish from the registry."""
    import importlib
    import re
    from pathlib import Path

    pkg = importlib.import_module(package)
    root = Path(pkg.__file__).parent
    registering = {".".join(f.relative_to(root).with_suffix("").parts) for f in root.rglob("*.py")
                   if re.search(r"^@(registry\.)?register(_model)?\(|^@(attack|defense)_evaluator\(",
                                f.read_text(), re.M)}
    assert registering, f"{package}: no registering module found (the pattern is wrong)"
    assert registering == set(pkg.COMPONENT_MODULES)


def test_a_broken_component_module_fails_loudly(monkeypatch):
    """A module that cannot be imported is an error at discovery, not a component that quietly disappears."""
    import sys
    import types

    fake = types.ModuleType("safedl_fake_components")
    fake.COMPONENT_MODULES = ("broken",)
    monkeypatch.setitem(sys.modules, "safedl_fake_components", fake)
    monkeypatch.setitem(registry._PACKAGES, "inspector", "safedl_fake_components")
    monkeypatch.setattr(registry, "_loaded", set())
    with pytest.raises(ModuleNotFoundError, match="safedl_fake_components.broken"):
        registry.names("inspector")


def test_every_kind_is_listed_with_entries():
    assert set(registry.COMPONENT_KINDS) < set(registry.KINDS)
    assert {"model", "executor", "attack_evaluator", "defense_evaluator"} <= set(registry.KINDS)
    assert registry.names("model") == ["mlp", "preact_resnet18", "resnet18", "resnet_small", "small_cnn", "tiny_cnn"]
    assert registry.names("executor") == ["process", "ray", "serial"]
    assert registry.names("attack_evaluator") == ["backdoor", "evasion", "extraction", "poisoning"]
    assert "cleanser/backdoor" in registry.names("defense_evaluator")


ALL = [(k, n) for k in registry.COMPONENT_KINDS for n in registry.names(k)]


@pytest.mark.parametrize("kind,name", ALL)
def test_component_has_docstring_and_builds_with_defaults(kind, name):
    cls = registry.get(kind, name)
    assert registry.summary(cls), f"{kind} {name} needs a docstring"
    if all(not p.required for p in registry.params(kind, name)):
        obj = registry.create(kind, name)
        assert type(obj) is cls or not isinstance(cls, type)  # a registered function (an alias) builds a class
        assert registry.creation_params(obj) == {}


def test_creation_params_are_the_non_default_arguments_read_back_from_the_component():
    """Constructors store their arguments unchanged (derived values are computed where used), so the arguments a
    bundle needs to rebuild a component come from the component itself, however it was made."""
    from safedl.attacks.evasion.pgd import PGD

    pgd = registry.create("evasion", "pgd", eps=0.1, steps=3)
    assert registry.creation_params(pgd) == {"eps": 0.1, "steps": 3}
    assert registry.creation_params(PGD(eps=0.1, steps=3, alpha=None)) == {"eps": 0.1, "steps": 3}
    assert pgd.alpha is None and pgd.step_size == 2.5 * 0.1 / 3
    squeeze = registry.create("preprocessor", "feature_squeezing", bit_depth=3)
    assert registry.creation_params(squeeze) == {"bit_depth": 3} and "registry" not in repr(squeeze)


WITH_CONFORMANCE = [(k, n) for k, n in ALL if getattr(registry.get(k, n), "conformance_params", None)]


@pytest.mark.parametrize("kind,name", WITH_CONFORMANCE)
def test_creation_params_round_trip_the_conformance_arguments(kind, name):
    """Non-default arguments come back unchanged, and rebuilding from them gives the same arguments again."""
    given = registry.get(kind, name).conformance_params
    obj = registry.create(kind, name, **given)
    got = registry.creation_params(obj)
    canonical = registry._canonical  # noqa: SLF001 (the test checks the comparison the registry uses)
    assert canonical(got) == canonical({k: v for k, v in given.items()
                                        if canonical(v) != canonical(_default(kind, name, k))})
    assert canonical(registry.creation_params(registry.create(kind, name, **got))) == canonical(got)


def _default(kind: str, name: str, param: str):
    return next(p.default for p in registry.params(kind, name) if p.name == param)
