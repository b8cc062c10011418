"""Every registered component stores its constructor arguments unchanged (derived values are computed where used),
so ``registry.creation_params`` rebuilds it without a side channel: each numeric or boolean parameter, moved off its
default, comes back as given, and rebuilding from what comes back gives the same arguments again."""
from __future__ import annotations

import warnings

import pytest

from safedl import registry
from safedl.errors import SafedlError


def _moved(default):
    """A different value of the default's type (None, strings and containers have no generic neighbour: skipped)."""
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default / 2 if 0 < default <= 1 else (default * 2 if default else 0.5)
    return None


def _cases():
    out = []
    for kind in registry.COMPONENT_KINDS:
        for name in registry.names(kind):
            ps = registry.params(kind, name)
            if any(p.required for p in ps):
                continue
            out += [(kind, name, p.name, _moved(p.default)) for p in ps if _moved(p.default) is not None]
    return out


CASES = _cases()


def test_the_round_trip_reaches_every_kind():
    assert {k for k, *_ in CASES} == set(registry.COMPONENT_KINDS)


@pytest.mark.parametrize("kind,name,param,value", CASES, ids=[f"{k}:{n}.{p}" for k, n, p, _ in CASES])
def test_a_moved_argument_comes_back_unchanged(kind, name, param, value):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the clean_label alias warns
        try:
            obj = registry.create(kind, name, **{param: value})
        except (SafedlError, ValueError) as exc:  # a value this component refuses (e.g. a fraction above 1)
            pytest.skip(f"{value!r} is not valid here: {exc}")
        got = registry.creation_params(obj)
        assert got == {param: value} and type(got[param]) is type(value)
        assert registry.creation_params(registry.create(kind, obj.registry_name, **got)) == got
