"""Threat questionnaire: interactive (through a pseudo-terminal) and by flags; every threat_model field has an effect."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from safedl.cli import app
from safedl.errors import ProfileError
from safedl.profile import load_profile, parse_profile

ROOT = Path(__file__).resolve().parents[1]
WHITE_BOX = {"fgsm", "pgd", "ensemble", "apgd_ce", "apgd_dlr", "cw_l2", "deepfool"}


def _init(tmp_path, name, *flags):
    out = tmp_path / f"{name}.yaml"
    res = CliRunner().invoke(app, ["init", str(out), *flags])
    assert res.exit_code == 0, res.output
    return load_profile(out)


def _evasion(profile):
    return {a.name: a for a in profile.attacks.evasion}


def test_flags_give_profiles_that_follow_the_answers(tmp_path):
    black = _init(tmp_path, "black", "--access", "black-box", "--outputs", "labels")
    white = _init(tmp_path, "white", "--access", "white-box", "--outputs", "scores")
    gray = _init(tmp_path, "gray", "--access", "gray-box", "--outputs", "none", "--deployment", "internal")
    ev = _evasion(black)
    assert not WHITE_BOX & set(ev) and {"hopskipjump", "transfer"} <= set(ev)  # query-based, no gradient attack
    assert ev["transfer"].params["source"] == "queries" and "square" not in ev
    assert {"fgsm", "pgd", "square"} <= set(_evasion(white))
    g = _evasion(gray)
    assert set(g) == {"transfer"} and g["transfer"].params == {"surrogate": "small_cnn", "source": "train",
                                                               "attack": "pgd", "eps": 0.3}
    trusted = _init(tmp_path, "trusted", "--data-source", "trusted")
    assert not trusted.attacks.poisoning and not trusted.attacks.backdoor and white.attacks.backdoor
    targeted = _init(tmp_path, "targeted", "--goal", "targeted", "--sensitivity", "high")
    assert all(a.targeted for a in targeted.attacks.evasion) and _evasion(targeted)["pgd"].params["steps"] == 40
    assert targeted.evaluation.gate.max_risk == "medium"
    copy = _init(tmp_path, "copy", "--goal", "copy", "--outputs", "labels")
    assert [a.name for a in copy.attacks.extraction] == ["copycat"] and copy.threat_model.attack_goal == "any"
    backdoor = _init(tmp_path, "backdoor", "--goal", "backdoor")
    assert not backdoor.attacks.evasion and not backdoor.attacks.poisoning and backdoor.attacks.backdoor
    assert _evasion(_init(tmp_path, "internal", "--deployment", "internal"))["square"].params["max_queries"] == 1000


def test_contradicting_answers_write_nothing(tmp_path):
    out = tmp_path / "p.yaml"
    res = CliRunner().invoke(app, ["init", str(out), "--access", "black-box", "--deployment", "edge_device"])
    assert res.exit_code == 2 and "edge_device" in res.output and not out.exists()
    res = CliRunner().invoke(app, ["init", str(out), "--outputs", "probabilities"])
    assert res.exit_code == 2 and "--outputs" in res.output and not out.exists()


def _prof(tm, evasion=(), poisoning=(), backdoor=(), extraction=()):
    return {"threat_model": tm, "dataset": {"name": "digits"}, "model": {"arch": "tiny_cnn"},
            "attacks": {"evasion": list(evasion), "poisoning": list(poisoning), "backdoor": list(backdoor),
                        "extraction": list(extraction)}}


def _errors(data):
    try:
        parse_profile(data)
    except ProfileError as exc:
        return [loc for loc, _ in exc.errors]
    return []


PGD = {"name": "pgd", "params": {"eps": 0.2}}
TRANSFER_TRAIN = {"name": "transfer", "params": {"source": "train"}}
TRANSFER_QUERIES = {"name": "transfer", "params": {"source": "queries"}}
FLIP = {"name": "label_flipping"}
PATCH = {"name": "static_patch"}
COPY = {"name": "copycat"}


@pytest.mark.parametrize("tm,kw,bad", [
    ({"model_access": "gray-box"}, {"evasion": [PGD]}, ["attacks.evasion[0].name"]),   # gray-box is not white-box
    ({"model_access": "gray-box"}, {"evasion": [TRANSFER_TRAIN]}, []),               # ... it gets a surrogate
    ({"model_access": "black-box"}, {"evasion": [TRANSFER_TRAIN]}, ["attacks.evasion[0].params"]),
    ({"model_access": "black-box"}, {"evasion": [TRANSFER_QUERIES]}, []),
    ({"model_access": "black-box", "interface_exposed": "none", "deployment_scenario": "internal"},
     {"evasion": [TRANSFER_QUERIES]}, ["attacks.evasion[0].params"]),
    ({"attack_goal": "backdoor"}, {"evasion": [PGD], "backdoor": [PATCH]}, ["attacks.evasion[0]"]),
    ({"attack_goal": "availability"}, {"poisoning": [FLIP], "backdoor": [PATCH]}, ["attacks.backdoor[0]"]),
    ({"attack_goal": "targeted"}, {"evasion": [PGD]}, ["attacks.evasion[0].targeted"]),
    ({"attack_goal": "untargeted"}, {"evasion": [PGD], "extraction": [COPY]}, ["attacks.extraction[0]"]),
    ({"attack_goal": "any"}, {"extraction": [COPY]}, []),
    ({"attack_goal": "targeted"}, {"evasion": [dict(PGD, targeted=True)]}, []),
    ({"deployment_scenario": "edge_device", "model_access": "gray-box"}, {"evasion": [TRANSFER_TRAIN]},
     ["threat_model.model_access"]),
    ({"deployment_scenario": "cloud_api", "interface_exposed": "none"}, {"evasion": [PGD]},
     ["threat_model.interface_exposed"]),
])
def test_every_threat_model_field_changes_what_validates(tm, kw, bad):
    assert _errors(_prof(tm, **kw)) == bad


def test_interactive_init_through_a_pseudo_terminal(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    out = tmp_path / "asked.yaml"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), COLUMNS="120", TERM="dumb")
    child = pexpect.spawn(sys.executable, ["-m", "safedl.cli", "init", str(out), "--interactive"], env=env,
                          encoding="utf-8", timeout=60)
    answers = [("Who can get at the model", "black-box"), ("What does a query return", "labels"),
               ("Who supplies or labels", "crowdsourced"), ("What would an attacker want", "nonsense"),
               ("Please select one of the available options", "untargeted"),
               ("How costly is a wrong answer", ""), ("Where does the model run", "cloud_api")]
    for prompt, reply in answers:
        child.expect(prompt)
        child.sendline(reply)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    prof = load_profile(out)
    tm = prof.threat_model
    assert (tm.model_access, tm.interface_exposed, tm.training_data_source, tm.attack_goal, tm.data_sensitivity) == (
        "black-box", "labels", "crowdsourced", "untargeted", "medium")  # empty answer: the default
    assert not WHITE_BOX & set(_evasion(prof)) and "hopskipjump" in _evasion(prof)
    assert prof.attacks.poisoning[0].params["strategy"] == "fully_random" and not prof.attacks.backdoor
    flags = tmp_path / "flags.yaml"
    CliRunner().invoke(app, ["init", str(flags), "--access", "black-box", "--outputs", "labels", "--data-source",
                             "crowdsourced", "--goal", "untargeted"])
    assert yaml.safe_load(flags.read_text())["attacks"] == yaml.safe_load(out.read_text())["attacks"]
