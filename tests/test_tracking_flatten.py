"""What `safedl run --mlflow` sends: flat parameters of the resolved profile, every metric of results.json (per
attack and per defense, with intervals and n), the gate outcome and the hashes as tags (no MLflow needed)."""
from __future__ import annotations

from safedl.tracking.flatten import PARAM_VALUE_MAX, flat_metrics, flat_params, metric_key, run_tags

M = {"value": 0.9, "ci95": [0.85, 0.93], "n": 200}
RESULTS = {
    "run_id": "r1", "environment": {"safedl": "0.1.0", "seed": 3},
    "profile": {"name": "p", "seed": 3, "attacks": {"evasion": [{"name": "pgd", "params": {"eps": 0.3}}]},
                "notes": "x" * (PARAM_VALUE_MAX + 10), "defenses": []},
    "data": {"hashes": {"train": "aa", "val": "bb", "test": "cc"}},
    "baseline": {"metrics": {"clean_accuracy": M}},
    "attacks": [{"id": "pgd", "name": "pgd", "metrics": {"robust_accuracy": {"value": 0.1, "ci95": [0.05, 0.2],
                                                                             "n": 100}}, "time_s": 2.5}],
    "defenses": [{"id": "fs", "against": "pgd", "metrics": {"detection": {"tpr": {"value": 0.7, "ci95": [0.6, 0.8],
                                                                                  "n": 50}}}}],
    "gate": {"passed": False, "failures": ["robust_accuracy 0.1 < 0.5"]},
}


def test_params_are_the_flattened_profile():
    p = flat_params(RESULTS["profile"])
    assert p["name"] == "p" and p["seed"] == "3"
    assert p["attacks.evasion.0.name"] == "pgd" and p["attacks.evasion.0.params.eps"] == "0.3"
    assert len(p["notes"]) == PARAM_VALUE_MAX and p["defenses"] == "[]"


def test_every_metric_per_attack_and_defense_with_interval_and_gate():
    m = flat_metrics(RESULTS)
    assert m["baseline.clean_accuracy"] == 0.9 and m["baseline.clean_accuracy.ci95_lo"] == 0.85
    assert m["baseline.clean_accuracy.n"] == 200
    assert m["attack.pgd.robust_accuracy"] == 0.1 and m["attack.pgd.time_s"] == 2.5
    assert m["defense.fs.pgd.detection.tpr"] == 0.7 and m["defense.fs.pgd.detection.tpr.ci95_hi"] == 0.8
    assert m["gate.passed"] == 0.0


def test_tags_carry_hashes_gate_and_bundles():
    t = run_tags(RESULTS, {"feature_squeezing": "d" * 64})
    assert t["data.hash.train"] == "aa" and t["data.hash.val"] == "bb" and t["safedl.seed"] == "3"
    assert t["gate.passed"] == "false" and "robust_accuracy" in t["gate.failures"]
    assert t["bundle.sha256.feature_squeezing"] == "d" * 64


def test_metric_keys_only_use_characters_mlflow_accepts():
    assert metric_key("defense", "a:b", "c(d)") == "defense.a_b.c_d_"
