"""Units of the decision layer: SLO -> gate thresholds, recommendation ranking, paired comparisons, per-image bits."""
from __future__ import annotations

import copy

import pytest
import torch
import yaml
from typer.testing import CliRunner

from safedl.decide.compare import compare_pair, holm, mcnemar_exact
from safedl.decide.recommend import recommend, recommended_profile
from safedl.decide.slo import gate_with_slo, load_slo
from safedl.cli import app
from safedl.errors import ProfileError, UserError
from safedl.profile import GateSpec, Profile, parse_profile
from safedl.utils.bits import pack, unpack
from safedl.utils.stats import proportion


def test_slo_objectives_become_gate_thresholds_and_bad_files_are_refused(tmp_path):
    good = tmp_path / "slo.yaml"
    good.write_text(yaml.safe_dump({"interval": "lower", "objectives": [
        {"sli": "attack_success_rate", "target": 0.1}, {"sli": "clean_accuracy", "target": 0.9}]}))
    gate = gate_with_slo(GateSpec(min_clean_accuracy=0.5, min_robust_accuracy=0.2), load_slo(good))
    assert (gate.max_attack_success_rate, gate.min_clean_accuracy, gate.min_robust_accuracy, gate.use_interval) == (
        0.1, 0.9, 0.2, "lower")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"objectives": [{"sli": "precision_of_everything", "target": 0.5}]}))
    with pytest.raises(ProfileError, match="unknown SLI 'precision_of_everything'.*clean_accuracy"):
        load_slo(bad)
    out_of_range = tmp_path / "range.yaml"
    out_of_range.write_text(yaml.safe_dump({"objectives": [{"sli": "clean_accuracy", "target": 1.5}]}))
    with pytest.raises(ProfileError, match="sli clean_accuracy"):
        gate_with_slo(GateSpec(), load_slo(out_of_range), source="range.yaml")
    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump({"dataset": {"name": "digits"}, "model": {"arch": "tiny_cnn"},
                                    "attacks": {"evasion": [{"name": "fgsm"}]}, "output": {"dir": str(tmp_path / "r")}}))
    res = CliRunner().invoke(app, ["run", str(prof), "--slo", str(bad)])
    assert res.exit_code == 2 and "unknown SLI" in res.output and not (tmp_path / "r").exists()


def _results():
    prof = Profile(attacks={"evasion": [{"name": "pgd"}, {"name": "fgsm"}], "backdoor": [{"name": "static_patch"}]},
                   defenses=[{"name": "feature_squeezing", "against": ["pgd"]},
                             {"name": "jpeg_compression", "against": ["pgd"]}]).model_dump(mode="json")
    ev = lambda aid, k: {"id": aid, "name": aid, "category": "evasion", "params": {"eps": 0.2, "norm": "linf"},  # noqa
                         "metrics": {"robust_accuracy": proportion(k, 200)}}
    d = lambda did, k, clean: {"id": did, "name": did, "against": "pgd", "metrics": {  # noqa
        "robust_accuracy": proportion(k, 200), "clean_accuracy": proportion(clean, 200),
        "clean_accuracy_undefended": proportion(190, 200)}}
    return {"profile": prof, "baseline": {"metrics": {"clean_accuracy": proportion(190, 200)}},
            "attacks": [ev("pgd", 0), ev("fgsm", 198),
                        {"id": "static_patch", "name": "static_patch", "category": "backdoor",
                         "metrics": {"attack_success_rate": proportion(170, 180)}}],
            "defenses": [d("feature_squeezing", 120, 185), d("jpeg_compression", 1, 188)]}


def test_recommend_ranks_measured_evidence_then_priors_and_writes_a_resumable_profile():
    results = _results()
    rec = {r["attack"]: r for r in recommend(results)["attacks"]}
    pgd = rec["pgd"]
    assert [c["defense"] for c in pgd["candidates"]][:1] == ["feature_squeezing"]
    assert pgd["recommended"]["evidence"] == "measured" and "measured in this run" in pgd["recommended"]["why"]
    jpeg = next(c for c in pgd["candidates"] if c["defense"] == "jpeg_compression")
    assert not jpeg["helps"] and pgd["candidates"][-1] is jpeg  # measured not to help: last, never recommended
    assert not rec["fgsm"]["succeeded"] and rec["fgsm"]["recommended"] is None  # 1% robust error: below 0.05
    bd = rec["static_patch"]
    assert bd["recommended"]["defense"] == "spectral_signatures" and bd["recommended"]["evidence"] == "prior"
    assert "bench/measure_poisoning_defenses.py" in bd["recommended"]["why"]
    prof = recommended_profile(results, recommend(results))
    added = prof["defenses"][len(results["profile"]["defenses"]):]
    assert added == [{"name": "spectral_signatures", "params": {}, "against": ["static_patch"]}]
    parse_profile(prof)  # valid, ready for --resume
    no_measure = copy.deepcopy(results)
    no_measure["defenses"] = []
    prior = {r["attack"]: r for r in recommend(no_measure)["attacks"]}["pgd"]["recommended"]
    assert prior["defense"] == "adversarial_training" and prior["evidence"] == "prior"
    added = recommended_profile(no_measure, recommend(no_measure))["defenses"][-2]
    assert added == {"name": "adversarial_training", "params": {"eps": 0.2}, "against": ["pgd"]}  # the attack's eps


def _run(correct: torch.Tensor, test_hash="h"):
    return {"data": {"name": "d", "shape": [1, 8, 8], "num_classes": 10, "hashes": {"test": test_hash}},
            "baseline": {"metrics": {"clean_accuracy": proportion(int(correct.sum()), len(correct))},
                         "per_image": {"clean_correct": pack(correct)}}, "attacks": [], "defenses": []}


def test_paired_comparison_finds_a_planted_regression_and_not_a_reshuffle():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(400, generator=g) < 0.9
    worse = a.clone()
    worse[torch.nonzero(a)[:30, 0]] = False  # 30 images the new model gets wrong
    row = compare_pair(_run(a), _run(worse))[0]
    assert row["verdict"] == "worse" and row["discordant"] == {"only_a": 30, "only_b": 0}
    same_rate = a.clone()
    idx_t, idx_f = torch.nonzero(a)[:10, 0], torch.nonzero(~a)[:10, 0]
    same_rate[idx_t], same_rate[idx_f] = False, True  # as accurate, different images: not a change
    assert compare_pair(_run(a), _run(same_rate))[0]["verdict"] == "no significant change"
    assert mcnemar_exact(a, a) == (0, 0, 1.0)
    other = compare_pair(_run(a), _run(worse, test_hash="other"))[0]
    assert other["test"].startswith("Fisher exact (unpaired: different test images")
    with pytest.raises(UserError, match="different data"):
        compare_pair(_run(a), dict(_run(a), data={"name": "mnist5k", "hashes": {"test": "h"}}))
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_per_image_bits_roundtrip():
    for n in (0, 1, 9, 1000):
        m = torch.rand(n) < 0.5
        assert torch.equal(unpack(pack(m)), m)
    assert len(pack(torch.ones(1000, dtype=torch.bool))["bits"]) == 168


def test_one_recommended_prior_covers_every_attack_it_is_recommended_for():
    results = _results()
    results["defenses"] = []
    results["attacks"][1]["metrics"]["robust_accuracy"] = proportion(0, 200)  # fgsm now succeeds too
    prof = recommended_profile(results, recommend(results))
    at = [d for d in prof["defenses"] if d["name"] == "adversarial_training"]
    assert at == [{"name": "adversarial_training", "params": {"eps": 0.2}, "against": ["pgd", "fgsm"]}]
    parse_profile(prof)
