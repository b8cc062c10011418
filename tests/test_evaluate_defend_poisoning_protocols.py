"""The poisoning-defense handlers rely on each kind's protocol; provenance is measured as it is used; the trusted
clean set is an explicit, validated assumption; cleansers warn in settings where they are measured to fail."""
from __future__ import annotations

import json

import pytest
import torch

from _poison_planted import TARGET, fresh, plant_backdoor, trigger
from safedl import registry
from safedl.evaluate.context import RunContext
from safedl.evaluate.defend_poisoning import contributors
from safedl.evaluate.base import AttackOutcome
from safedl.run.handlers import get_defense_handler
from safedl.defenses.protocols import POISONING_PROTOCOLS
from safedl.errors import ProfileError
from safedl.models import TrainRecipe
from safedl.profile import DefenseSpec, Profile, TrustedDataSpec, parse_profile


def _ctx(splits, model, tmp, **profile_kw):
    profile = Profile(training=TrainRecipe(epochs=8, batch_size=64, lr=3e-3, augment="none"), **profile_kw)
    return RunContext(profile=profile, splits=splits, device=torch.device("cpu"), run_dir=tmp, baseline=model,
                      build_fresh=lambda: fresh(splits))


def _outcome(ctx, poisoned, *, target):
    m = ctx.train_like_baseline(poisoned)
    keep = ctx.splits.test.y != (TARGET if target is not None else -1)
    state = {"poisoned": poisoned, "model_state": m.state_dict(), "attack": None, "target_class": target,
             "test_triggered_x": trigger(ctx.splits.test.x[keep]) if target is not None else None,
             "test_triggered_y": ctx.splits.test.y[keep]}
    return AttackOutcome(entry={"name": "planted", "id": "planted", "category": "poisoning"}, state=state)


def _targeted_flips(train):
    """80% of class 3 relabelled 8: poison that costs trusted accuracy (what a per-source test can see)."""
    from safedl.data.dataset import PoisonedDataset

    y = train.y.clone()
    src = torch.nonzero(y == 3).flatten()
    y[src[: int(0.8 * len(src))]] = 8
    return PoisonedDataset.from_clean(train, x=train.x, y=y)


def _run(ctx, outcome, kind, name, **params):
    entry = get_defense_handler(kind, "poisoning")(ctx, DefenseSpec(name=name, params=params),
                                                   [registry.create(kind, name, **params)], outcome)
    json.dumps(entry)
    return entry


@pytest.mark.parametrize("kind", sorted(POISONING_PROTOCOLS))
def test_every_poisoning_component_satisfies_its_kinds_protocol(kind):
    proto = POISONING_PROTOCOLS[kind]
    for name in registry.names(kind):
        comp = registry.create(kind, name)
        assert isinstance(comp, proto), f"{kind} {name!r} does not implement {proto.__name__}"
        if kind == "cleanser":
            assert comp.inputs <= {"model", "trusted", "train_fn", "provenance"}
            assert comp.trusted_data in ("required", "optional", "unused")


def test_provenance_finds_the_attackers_contributor_from_accuracy_and_labels_the_tamper_check(
        digits_splits, tiny_model, tmp_path):
    ctx = _ctx(digits_splits, tiny_model, tmp_path)
    flips = _targeted_flips(digits_splits.train)
    src = contributors(flips, n_sources=5, attacker=0, seed=0)
    assert bool((src[flips.is_poison] == 0).all()) and len(torch.unique(src[~flips.is_poison])) == 5
    e = _run(ctx, _outcome(ctx, flips, target=None), "cleanser", "provenance_tracking")
    m = e["metrics"]
    assert m["attacker_source_flagged"]["value"] == 1.0  # from trusted accuracy alone: the hashes all match
    assert e["info"]["tampered"] == 0 and e["info"]["flagged_sources"] == [0]
    assert m["detection"]["tpr"]["value"] == 1.0
    tamper = m["detection_tamper_after_ingestion"]
    assert tamper["tpr"]["value"] == 1.0 and tamper["fpr"]["value"] == 0.0
    assert any(n.startswith("provenance (headline)") for n in e["notes"])
    assert any("by construction" in n for n in e["notes"])


def test_provenance_contributors_come_from_the_profile(digits_splits, tiny_model, tmp_path):
    """Another contributor count and attacker index (profile key ``data_provenance``): the per-source test still
    names the attacker's contributor, and only it, from trusted accuracy alone."""
    prov = parse_profile({"baseline_only": True, "data_provenance": {"contributors": 3, "attacker": 2}},
                         source="p.yaml").data_provenance
    ctx = _ctx(digits_splits, tiny_model, tmp_path, data_provenance=prov)
    flips = _targeted_flips(digits_splits.train)
    src = contributors(flips, n_sources=3, attacker=2, seed=0)
    assert bool((src[flips.is_poison] == 2).all()) and sorted(torch.unique(src).tolist()) == [0, 1, 2]
    e = _run(ctx, _outcome(ctx, flips, target=None), "cleanser", "provenance_tracking")
    m = e["metrics"]
    assert e["info"]["tampered"] == 0 and e["info"]["flagged_sources"] == [2]
    assert m["attacker_source_flagged"]["value"] == 1.0 and m["clean_contributors_flagged"]["value"] == 0
    assert m["contributors_flagged"]["n"] == 3 and [p["source"] for p in e["info"]["per_source"]] == [0, 1, 2]
    assert any("3 named contributors" in n and "contributor 2 supplies every poison" in n for n in e["notes"])
    # poison spread over every contributor: no attacker to name, and poison sits in every source
    spread = contributors(flips, n_sources=3, attacker=2, seed=0, spread="uniform")
    assert len(torch.unique(spread[flips.is_poison])) == 3


@pytest.mark.parametrize("bad, match", [
    ({"contributors": 4, "attacker": 4}, r"data_provenance.*attacker=4 is not a contributor: allowed 0\.\.\.3"),
    ({"contributors": 1}, r"data_provenance\.contributors.*greater than or equal to 2"),
    ({"attacker": -1}, r"data_provenance\.attacker"),
    ({"poison_spread": "half"}, r"data_provenance\.poison_spread.*'attacker' or 'uniform'"),
])
def test_invalid_provenance_keys_are_one_clear_error(bad, match):
    with pytest.raises(ProfileError, match=match):
        parse_profile({"baseline_only": True, "data_provenance": bad}, source="p.yaml")


def test_trusted_clean_set_option_reaches_the_cleanser_and_warns(digits_splits, tiny_model, tmp_path):
    p = plant_backdoor(digits_splits.train, 0.1)
    ctx = _ctx(digits_splits, tiny_model, tmp_path, trusted_clean_set=TrustedDataSpec(source="none"))
    outcome = _outcome(ctx, p, target=TARGET)
    e = _run(ctx, outcome, "cleanser", "spectral_signatures")
    assert any(n.startswith("no trusted clean set") for n in e["notes"])
    assert any(n.startswith("warning: spectral_signatures is known to fail here (trusted:none)") for n in e["notes"])
    with pytest.raises(ProfileError, match="needs a trusted clean set"):  # never silently fitted on poisoned data
        _run(ctx, outcome, "repair", "pruning")
    ctx_small = _ctx(digits_splits, tiny_model, tmp_path, trusted_clean_set=TrustedDataSpec(size=100))
    e2 = _run(ctx_small, outcome, "cleanser", "spectral_signatures")
    assert any("(100 images)" in n for n in e2["notes"])
    warned = [n for n in e2["notes"] if n.startswith("warning")]  # 10 a class: below the 50 measured to hold
    assert len(warned) == 1 and "(trusted:small)" in warned[0]


def test_defenses_that_need_trusted_data_are_refused_at_validation():
    base = {"attacks": {"backdoor": [{"name": "static_patch"}]}, "trusted_clean_set": {"source": "none"}}
    for name in ("roni", "influence_functions", "fine_pruning", "per_class_monitoring", "strip"):
        with pytest.raises(ProfileError, match=rf"defenses\[0\].*{name}.*needs a trusted clean set"):
            parse_profile({**base, "defenses": [{"name": name}]}, source="p.yaml")
    parse_profile({**base, "defenses": [{"name": "spectral_signatures"}]}, source="p.yaml")  # optional: allowed
    with pytest.raises(ProfileError, match="trusted_clean_set"):
        parse_profile({"trusted_clean_set": {"source": "path"}}, source="p.yaml")


def test_all_to_all_backdoor_relabels_c_to_c_plus_1_and_is_warned_about(digits_splits):
    atk = registry.create("backdoor", "static_patch", mapping="all_to_all", poison_fraction=0.2, patch_size=2,
                          trigger="square", seed=0)
    train = digits_splits.train
    p = atk.poison(train, generator=torch.Generator().manual_seed(0))
    idx = torch.nonzero(p.is_poison).flatten()
    assert len(idx) == round(0.2 * len(train))
    assert torch.equal(p.y[idx], (train.y[idx] + 1) % 10) and len(torch.unique(train.y[idx])) == 10
    assert torch.equal(p.y[~p.is_poison], train.y[~p.is_poison])
    assert torch.equal(atk.backdoor_labels(torch.tensor([0, 9]), 10), torch.tensor([1, 0]))
    from safedl.evaluate.defend_poisoning import known_weak_warnings

    ss = registry.create("cleanser", "spectral_signatures")
    assert any("(mapping:all_to_all)" in w for w in known_weak_warnings(ss, p.info, trusted=True))
    with pytest.raises(Exception, match="label_mode='dirty'"):
        registry.create("backdoor", "static_patch", mapping="all_to_all", label_mode="clean")


def test_inspector_verdict_is_scored_against_the_attack(digits_splits, tiny_model, tmp_path):
    ctx = _ctx(digits_splits, tiny_model, tmp_path)
    flips = _targeted_flips(digits_splits.train)
    outcome = _outcome(ctx, flips, target=None)
    outcome.state["target_class"] = 8
    e = _run(ctx, outcome, "inspector", "per_class_monitoring")
    assert e["metrics"]["model_flagged"]["value"] == 1.0 and e["metrics"]["target_class_flagged"]["value"] == 1.0
    assert 3 in e["info"]["accuracy_dropped"] and 8 in e["info"]["absorbing_classes"]
