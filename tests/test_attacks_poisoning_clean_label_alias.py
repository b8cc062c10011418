"""The one-release ``clean_label`` alias: it warns once, naming the new name, and poisons bit-identically to the
registered class its ``method`` names (feature collision, Shafahi et al. 2018; the label-consistent backdoor,
Turner et al. 2019), seeded."""
from __future__ import annotations

import warnings

import pytest
import torch

from safedl import registry

# (method, the class's registry name, parameters both accept); small so the fits take a second
CASES = [
    ("clean_label_backdoor", "label_consistent_backdoor",
     {"eps": 0.1, "steps": 3, "eot_shift": 1, "eot_samples": 2, "class_fraction": 0.3}),
    ("feature_collision", "feature_collision", {"n_victims": 3, "poisons_per_victim": 5, "fc_steps": 20}),
]


def _poison(attack, splits, surrogate, seed):
    kw = {}
    if getattr(attack, "needs_victims", False):
        vm = attack.victim_mask(splits.test.y)
        kw = {"victims": splits.test.x[vm][:3], "victim_labels": splits.test.y[vm][:3]}
    attack.fit(splits.train, surrogate=surrogate, **kw)
    return attack.poison(splits.train, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method,new,params", CASES, ids=[c[1] for c in CASES])
def test_the_alias_poisons_bit_identically_to_the_new_name(method, new, params, digits_splits, tiny_model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old_attack = registry.create("poisoning", "clean_label", method=method, **params)
    new_attack = registry.create("poisoning", new, **params)
    assert type(old_attack) is type(new_attack)
    assert registry.creation_params(old_attack) == registry.creation_params(new_attack)
    old = _poison(old_attack, digits_splits, tiny_model, seed=3)
    fresh = _poison(new_attack, digits_splits, tiny_model, seed=3)
    assert old.n_poison > 0
    assert torch.equal(old.x, fresh.x) and torch.equal(old.y, fresh.y)
    assert torch.equal(old.is_poison, fresh.is_poison)
    deprecations = [w for w in caught if issubclass(w.category, FutureWarning)]
    assert len(deprecations) == 1, [str(w.message) for w in caught]
    assert "deprecated" in str(deprecations[0].message) and f"'{new}'" in str(deprecations[0].message)


@pytest.mark.parametrize("new", [c[1] for c in CASES])
def test_the_new_names_do_not_warn(new):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        registry.create("poisoning", new)


def test_no_shipped_profile_names_the_alias():
    """Examples use the new names (``safedl init`` copies them); the alias is for users' existing profiles."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shipped = list((root / "examples").rglob("*.yaml")) + list((root / "src" / "safedl").rglob("*.yaml"))
    assert shipped
    offenders = [str(p.relative_to(root)) for p in shipped if "clean_label" in p.read_text()]
    assert offenders == []
