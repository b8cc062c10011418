"""``certifier:ibp`` from a profile: the kind-qualified name reaches the certifier (``ibp`` alone stays the trainer),
the run trains by IBP, attacks the model white-box and reports verified accuracy (n, Wilson interval) next to the
empirical robust accuracy, never above it."""
from __future__ import annotations


import pytest

from safedl import registry
from safedl.errors import ProfileError, UnknownComponentError
from safedl.profile import parse_profile

from _runs import run_profile
from _profiles import tiny_profile

EPS = 0.03
PROFILE = tiny_profile(
    name="tiny-ibp", training={"epochs": 6},
    attacks={"evasion": [{"name": "pgd", "params": {"eps": EPS, "steps": 10}},
                         {"name": "pgd", "id": "pgd_l2", "params": {"eps": 0.5, "norm": "l2", "steps": 5}}]},
    defenses=[{"name": "certifier:ibp", "params": {"eps": EPS}, "against": ["pgd", "pgd_l2"]}],
    evaluation={"n_eval": 60, "n_examples": 0, "strong_adaptive": {"enabled": True, "steps": 10, "restarts": 1}},
    output={"dir": "runs", "figures": False, "html": False},
)


def test_kind_qualified_names_pick_the_kind():
    assert registry.find_kind("ibp", registry.DEFENSE_KINDS) == "trainer"
    assert registry.find_kind("certifier:ibp", registry.DEFENSE_KINDS) == "certifier"
    assert registry.create("certifier", "certifier:ibp", eps=0.1).registry_kind == "certifier"
    with pytest.raises(UnknownComponentError, match="certifier:randomized_smoothing"):
        registry.find_kind("certifier:nope", registry.DEFENSE_KINDS)
    with pytest.raises(ProfileError, match=r"defenses\[0\]"):
        parse_profile(tiny_profile(attacks={"evasion": [{"name": "pgd"}]},
                                   defenses=[{"name": "certifier:nope"}]))


def test_run_reports_verified_next_to_empirical_robust_accuracy(tmp_path):
    run, r = run_profile(tmp_path, PROFILE)
    by = {d["against"]: d for d in r["defenses"]}
    d = by["pgd"]
    assert [c["kind"] for c in d["components"]] == ["certifier"]
    m = d["metrics"]
    ver, rob = m["verified_accuracy"], m["robust_accuracy"]
    assert ver["n"] == rob["n"] == 60 and ver["ci95"][0] <= ver["value"] <= ver["ci95"][1]
    assert ver["value"] <= rob["value"] and m["verified_but_broken"] == 0
    assert 0 < ver["value"]  # IBP training verifies some images at its own eps
    assert "robust_accuracy_strong_suite" in m  # the IBP model is attacked white-box like any changed model
    curve = m["certified_accuracy"]
    assert curve[f"linf_{EPS:g}"]["value"] == ver["value"]
    assert curve["linf_0.01"]["value"] >= curve["linf_0.2"]["value"]
    # an L2 attack gets no verified accuracy set against it (the certificate is for L-inf balls)
    assert "verified_accuracy" not in by["pgd_l2"]["metrics"] and "certified_accuracy" in by["pgd_l2"]["metrics"]
    report = (run / "report.md").read_text()
    assert "verified_accuracy" in report
