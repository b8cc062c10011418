"""Registry-wide checks (timm style): every component module imports, every component is documented and constructible."""
from __future__ import annotations

import pytest

from safedl import registry


def test_every_component_module_imports():
    registry.names("evasion")  # triggers discovery
    assert registry.import_errors == {}


ALL = [(k, n) for k in registry.KINDS for n in registry.names(k)]


@pytest.mark.parametrize("kind,name", ALL)
def test_component_has_docstring_and_builds_with_defaults(kind, name):
    cls = registry.get(kind, name)
    assert registry.summary(cls), f"{kind} {name} needs a docstring"
    if all(not p.required for p in registry.params(kind, name)):
        obj = registry.create(kind, name)
        assert obj is not None


def test_create_records_the_constructor_arguments_without_leaking_into_params():
    from safedl import registry

    pgd = registry.create("evasion", "pgd", eps=0.1, steps=3)
    assert registry.creation_params(pgd) == {"eps": 0.1, "steps": 3}
    assert not any("registry" in k for k in pgd.params())  # results.json's attack params stay the config
    squeeze = registry.create("preprocessor", "feature_squeezing", bit_depth=3)
    assert registry.creation_params(squeeze) == {"bit_depth": 3} and "registry" not in repr(squeeze)
