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
        assert type(obj) is cls and registry.creation_params(obj) == {}


def test_create_records_the_constructor_arguments_without_leaking_into_params():
    from safedl import registry

    pgd = registry.create("evasion", "pgd", eps=0.1, steps=3)
    assert registry.creation_params(pgd) == {"eps": 0.1, "steps": 3}
    assert not any("registry" in k for k in pgd.params())  # results.json's attack params stay the config
    squeeze = registry.create("preprocessor", "feature_squeezing", bit_depth=3)
    assert registry.creation_params(squeeze) == {"bit_depth": 3} and "registry" not in repr(squeeze)
