"""Per-key query detectors as defenses in the run: calibrated on training streams, judged on benign keys and on keys
running safedl's own query attacks (square, copycat), offline through ObservedModel."""
from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from safedl.cli import app
from _profiles import tiny_profile

PROFILE = tiny_profile(
    name="query-detectors", training={"epochs": 8},
    attacks={"evasion": [{"name": "square", "params": {"eps": 0.1, "max_queries": 300}},
                         {"name": "fgsm", "params": {"eps": 0.3}}],
             "extraction": [{"name": "copycat", "params": {"surrogate": "tiny_cnn", "epochs": 5, "lr": 0.003,
                                                           "budgets": [400], "transfer_eps": 0.3}}]},
    defenses=[{"name": "stateful_detector"}, {"name": "prada", "against": ["copycat"]}],
    evaluation={"n_eval": 100, "batch_size": None,
                "query_detection": {"benign_keys": 2, "benign_queries": 1000, "attack_keys": 2, "attack_budget": 400}},
    output={"html": False, "figures": False},
)


def _run(tmp, profile):
    path = tmp / "p.yaml"
    path.write_text(yaml.safe_dump(profile))
    return CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp / "runs"), "--no-progress", "-q"])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("query")
    res = _run(tmp, PROFILE)
    assert res.exit_code == 0, res.output
    run_dir = next((tmp / "runs").iterdir())
    return json.loads((run_dir / "results.json").read_text())


def test_entries_only_for_attacks_that_send_queries(results):
    pairs = {(d["id"], d["against"]) for d in results["defenses"]}
    # FGSM is white-box: no query stream, so `against: all` leaves it out
    assert pairs == {("stateful_detector", "square"), ("stateful_detector", "copycat"), ("prada", "copycat")}


def test_stateful_detector_flags_square_keys_early_and_blocking_cuts_their_success(results):
    d = next(e for e in results["defenses"] if e["id"] == "stateful_detector" and e["against"] == "square")
    m = d["metrics"]
    assert m["detected_within_budget"]["value"] == 1.0 and m["detected_within_budget"]["n"] == 2
    assert m["queries_to_detection_median"]["value"] < 400
    # blocked at its first flag, the key keeps only the images it broke before it
    assert m["attack_success_rate_after"]["value"] < m["attack_success_rate"]["value"]
    assert m["benign_false_alarm_rate"]["n"] == 4 and m["benign_false_alarm_rate_in_order"]["n"] == 2
    assert all(k["sent"] <= 400 for k in d["keys"])


def test_extraction_keys_rerun_the_profiles_attack_and_report_the_blocked_copy(results):
    (attack,) = [a for a in results["attacks"] if a["id"] == "copycat"]
    stage_fidelity = attack["curve"][-1]["fidelity"]["value"]  # the attack stage's own run at 400 queries, seed 0
    for d in (e for e in results["defenses"] if e["against"] == "copycat"):
        m = d["metrics"]
        assert m["attack_success_rate"]["n"] == 2 and 0 < m["fidelity_after"]["value"] <= 1
        # key 0 steals with the profile's attack, budget and seed through the observed oracle: the same copy
        assert d["keys"][0]["fidelity"] == pytest.approx(stage_fidelity, abs=1e-6)
        for k in d["keys"]:
            assert k["sent"] == 400 and (k["first"] is None or 1 <= k["first"] <= k["sent"])


def test_a_query_detector_named_against_a_white_box_attack_is_a_profile_error(tmp_path):
    bad = {**PROFILE, "defenses": [{"name": "stateful_detector", "against": ["fgsm"]}]}
    res = _run(tmp_path, bad)
    assert res.exit_code == 2
    assert "defenses[0].against" in res.output and "sends no stream of queries" in res.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("name", ["stateful_detector", "prada"])
def test_registered_query_detectors_keep_the_protocol_and_refuse_a_bad_fpr(name):
    from safedl import registry
    from safedl.defenses.query import QueryDetector
    from safedl.errors import UserError

    det = registry.create("query_detector", name)
    assert isinstance(det, QueryDetector) and callable(det.calibrate)
    with pytest.raises(UserError, match="fpr"):
        registry.create("query_detector", name, fpr=1.5)
