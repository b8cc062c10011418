"""The threat-profile schema: defaults valid, every error reported at once with its key path, threat-model rules."""
from __future__ import annotations

import pytest
import yaml

from safedl.errors import ProfileError
from safedl.profile import load_profile, parse_profile
from safedl.templates import DEFAULT_PROFILE


def test_default_profile_is_valid_and_matches_example():
    p = parse_profile(yaml.safe_load(DEFAULT_PROFILE))
    assert p.dataset.name == "mnist5k" and [a.name for a in p.attacks.evasion][:2] == ["fgsm", "pgd"]
    assert p.attacks.backdoor and p.attacks.poisoning and p.defenses
    with open("examples/default.yaml") as f:
        assert f.read() == DEFAULT_PROFILE


def test_every_error_is_reported_at_once_with_key_paths():
    bad = {"seed": -1, "training": {"epochs": 0}, "dataset": {"name": "nope"}, "unknown_key": 1}
    with pytest.raises(ProfileError) as exc:
        parse_profile(bad, source="p.yaml")
    keys = {k for k, _ in exc.value.errors}
    assert {"seed", "training.epochs", "unknown_key"} <= keys
    assert any(k.startswith("dataset") for k in keys)
    msg = str(exc.value)
    assert msg.startswith("p.yaml:") and "(got -1)" in msg and "mnist5k" in msg


def test_component_names_and_params_are_checked():
    bad = {"attacks": {"evasion": [{"name": "pgdd"}, {"name": "pgd", "id": "p", "params": {"eps": -1}},
                                   {"name": "fgsm", "params": {"epsilon": 0.1}}]},
           "defenses": [{"name": "fgsm_defense_that_does_not_exist", "against": ["zz"]}]}
    with pytest.raises(ProfileError) as exc:
        parse_profile(bad)
    errs = dict(exc.value.errors)
    assert "pgd" in errs["attacks.evasion[0].name"]  # the valid names are listed
    assert "eps=-1" in errs["attacks.evasion[1].params"]
    assert "epsilon" in errs["attacks.evasion[2].params"] and "eps" in errs["attacks.evasion[2].params"]
    assert "zz" in errs["defenses[0].against"]


def test_schema_and_component_errors_are_reported_together():
    bad = {"training": {"epochs": -3}, "attacks": {"evasion": [{"name": "pgdd"}]},
           "defenses": [{"name": "feature_squeezing", "against": ["pgd"]}]}
    with pytest.raises(ProfileError) as exc:
        parse_profile(bad)
    errs = dict(exc.value.errors)
    assert {"training.epochs", "attacks.evasion[0].name", "defenses[0].against"} <= set(errs)
    # a section with schema errors is not also checked against defaults (no spurious 'no attack with id' errors)
    with pytest.raises(ProfileError) as exc:
        parse_profile({"attacks": {"evasion": [{"name": "pgd", "bogus": 1}]},
                       "defenses": [{"name": "feature_squeezing", "against": ["pgd"]}]})
    assert [k for k, _ in exc.value.errors] == ["attacks.evasion[0].bogus"]


def test_black_box_threat_model_refuses_white_box_attacks():
    with pytest.raises(ProfileError) as exc:
        parse_profile({"threat_model": {"model_access": "black-box"}, "attacks": {"evasion": [{"name": "pgd"}]}})
    assert "white-box" in str(exc.value) and "attacks.evasion[0].name" in dict(exc.value.errors)


def test_duplicate_attack_ids_rejected():
    with pytest.raises(ProfileError, match="used twice"):
        parse_profile({"attacks": {"evasion": [{"name": "pgd"}, {"name": "pgd"}]}})


def test_load_profile_file_errors(tmp_path):
    with pytest.raises(ProfileError, match="not found"):
        load_profile(tmp_path / "missing.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("name: [unclosed\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(f)
    f.write_text("- a list\n")
    with pytest.raises(ProfileError, match="mapping"):
        load_profile(f)


@pytest.mark.parametrize("path", ["examples/default.yaml", "examples/model-stealing.yaml", "examples/ci/profile.yaml"])
def test_shipped_example_profiles_validate_and_plan(path):
    from safedl.run.planning import plan_defenses

    prof = load_profile(path)
    assert plan_defenses(prof)  # every listed defense has at least one attack it is evaluated against
