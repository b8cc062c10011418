"""Reviewed data back into training: ``dataset.extra`` grows only the training split (bad files refused naming the
entry), ``safedl retrain``'s replacement decision (gate and paired comparison), and issue 24's done-when end to end:
serve -> attack traffic rejected -> review queue -> label -> export -> retrain -> compare -> gate -> new bundle."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from _profiles import tiny_profile
from safedl.cli import app as cli
from safedl.errors import DataError, ProfileError
from safedl.profile import parse_profile
from safedl.run.prepare import prepare
from safedl.run.retrain import decide_replacement, retrain_profile

BASE = tiny_profile(name="rv", dataset={"split_seed": 0}, training={"epochs": 1}, evaluation=None, baseline_only=True)


def _npz(path, x, y):
    np.savez(path, x=np.asarray(x, dtype=np.float32), y=np.asarray(y, dtype=np.int64))
    return path


def test_dataset_extra_grows_only_the_training_split(tmp_path):
    plain, _, _ = prepare(parse_profile(BASE), base_dir=tmp_path)
    x = torch.rand(5, 1, 8, 8)
    _npz(tmp_path / "rev.npz", x, [1, 2, 3, 4, 5])
    prof = parse_profile({**BASE, "dataset": {**BASE["dataset"], "extra": [{"format": "npz", "path": "rev.npz"}]}})
    grown, _, _ = prepare(prof, base_dir=tmp_path)
    assert len(grown.train) == len(plain.train) + 5 and torch.equal(grown.train.x[-5:], x)
    assert grown.train.y[-5:].tolist() == [1, 2, 3, 4, 5]
    for part in ("val", "test"):
        assert grown.hashes()[part] == plain.hashes()[part]
    assert grown.hashes()["train"] != plain.hashes()["train"] and grown.mean == plain.mean
    _npz(tmp_path / "shape.npz", torch.rand(2, 1, 9, 9), [0, 1])
    _npz(tmp_path / "label.npz", torch.rand(2, 1, 8, 8), [0, 10])
    for name, match in (("shape.npz", r"dataset.extra\[0\].*shape \[1, 9, 9\].*\[1, 8, 8\]"),
                        ("label.npz", r"dataset.extra\[0\].*label 10 is not a class"),
                        ("missing.npz", "missing.npz: file not found")):
        p = parse_profile({**BASE, "dataset": {**BASE["dataset"], "extra": [{"path": name}]}})
        with pytest.raises(DataError, match=match):
            prepare(p, base_dir=tmp_path)
    with pytest.raises(ProfileError, match="extra"):
        parse_profile({**BASE, "dataset": {**BASE["dataset"], "extra": [{"format": "csv", "path": "a"}]}})
    again = retrain_profile(prof, [tmp_path / "rev.npz", tmp_path / "rev.npz"])
    assert len(again.dataset.extra) == 2  # relative "rev.npz" is not resolved yet; the absolute one is added once


def _results(correct: list[int], *, gate: dict) -> dict:
    from safedl.utils.bits import pack

    n = len(correct)
    m = {"value": sum(correct) / n, "ci95": [0.0, 1.0], "n": n}
    return {"data": {"name": "d", "shape": [1, 8, 8], "num_classes": 10, "hashes": {"test": "t"}},
            "baseline": {"metrics": {"clean_accuracy": m}, "per_image": {"clean_correct": pack(torch.tensor(correct,
                                                                                                 dtype=torch.bool))}},
            "attacks": [], "defenses": [], "gate": gate}


def test_replacement_needs_a_passed_configured_gate_and_no_regression():
    ok = {"passed": True, "configured": True, "failures": []}
    old = ("old", _results([1] * 90 + [0] * 10, gate=ok))
    same = ("new", _results([1] * 90 + [0] * 10, gate=ok))
    assert decide_replacement(old, same)["replace"] is True
    worse = ("new", _results([1] * 60 + [0] * 40, gate=ok))
    d = decide_replacement(old, worse)
    assert d["replace"] is False and d["reasons"][0].startswith("regression: new: baseline.clean_accuracy")
    failed = ("new", _results([1] * 90 + [0] * 10, gate={"passed": False, "configured": True,
                                                          "failures": ["min_clean_accuracy: 0.9 < 0.95"]}))
    assert decide_replacement(old, failed)["reasons"] == ["gate: min_clean_accuracy: 0.9 < 0.95"]
    unset = ("new", _results([1] * 90 + [0] * 10, gate={"passed": True, "configured": False, "failures": []}))
    assert "sets no threshold" in decide_replacement(old, unset)["reasons"][0]


E2E = tiny_profile(name="e2e", dataset={"split_seed": 0},
                   attacks={"evasion": [{"name": "fgsm", "params": {"eps": 0.2}}]},
                   defenses=[{"id": "detect", "against": ["fgsm"],
                              "pipeline": [{"name": "mahalanobis", "params": {"fpr": 0.1}}]}],
                   evaluation={"n_eval": 120, "batch_size": 120, "gate": {"min_clean_accuracy": 0.5}},
                   output={"dir": "runs", "html": False, "figures": False})


def _keep_artifact(doc: dict, tmp_path) -> None:
    import os
    from pathlib import Path

    out = Path(os.environ.get("SAFEDL_TEST_ARTIFACTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    (out / "review_e2e.json").write_text(json.dumps(doc, indent=2, default=str))


def _ok(res, code=0):
    assert res.exit_code == code, res.output
    return res


def test_done_when_serve_review_label_export_retrain_compare_gate_new_bundle(tmp_path, digits_splits):
    """Issue 24's done-when on tiny seeded data (digits, tiny_cnn, seed 0): FGSM traffic against the served
    detector is rejected and queued; a reviewer labels it (the true class, or attack); the export is added to
    training; the new run is compared with the served one and gated; its bundle replaces the served one."""
    from _serve_helpers import ServerProcess, png_bytes, quantized
    from safedl import registry
    from safedl.deploy import load_bundle
    from safedl.serve.keys import KeyStore

    run = CliRunner().invoke
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(E2E))
    _ok(run(cli, ["run", str(tmp_path / "p.yaml"), "--runs-dir", str(tmp_path / "runs"), "--no-progress", "-q"]))
    run_a = next((tmp_path / "runs").iterdir())
    _ok(run(cli, ["export", str(run_a), "--defense", "detect", "--out", str(tmp_path / "b1")]))
    b1 = load_bundle(tmp_path / "b1")
    keys = KeyStore(tmp_path / "keys.db", create=True)
    user = keys.create(name="attacker", tier="full", rate_per_s=1e4, burst=10_000)[1]
    ops = keys.create(name="ops", scopes=("admin", "model"), rate_per_s=1e4, burst=10_000)[1]
    review = tmp_path / "review.db"
    # white-box FGSM on the served model, on images of the data set's own test split (eps 0.2, seed-free)
    x, y = digits_splits.test.x[:60], digits_splits.test.y[:60]
    x_adv = quantized(registry.create("evasion", "fgsm", eps=0.2)(b1.pipeline.model, x, y))
    truth = {}
    server = ServerProcess(tmp_path / "b1", tmp_path / "keys.db", tmp_path / "audit.db", "--review", str(review))
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=30) as c:
            rejected = 0
            for img, label in zip(x_adv, y.tolist()):
                r = c.post("/v1/predict", files={"file": ("a.png", png_bytes(img), "image/png")},
                           headers={"Authorization": f"Bearer {user}"})
                assert r.status_code == 200, r.text
                res = r.json()["results"][0]
                truth[res["input_sha256"]] = label
                rejected += res["rejected"]
            assert rejected >= 30, rejected  # the detector flags most of the attack traffic
            lines = _ok(run(cli, ["review", "list", "--db", str(review), "--json"])).output.splitlines()
            queued = [json.loads(line) for line in lines]
            assert len(queued) == rejected and all(q["key_id"] == keys.list()[0].key_id for q in queued)
            for k, q in enumerate(queued):  # the reviewer: every third is called an attack, the rest get their class
                label = "attack" if k % 3 == 0 else str(truth[q["input_sha256"]])
                _ok(run(cli, ["review", "label", str(q["id"]), label, "--db", str(review), "--by", "reviewer"]))
            _ok(run(cli, ["review", "export", "--db", str(review), "--out", str(tmp_path / "reviewed.npz")]))
            added = len(queued) - len(range(0, len(queued), 3))
            res = run(cli, ["retrain", str(run_a), "--add", str(tmp_path / "reviewed.npz"), "--runs-dir",
                            str(tmp_path / "runs")])
            doc = json.loads(next(p for p in (tmp_path / "runs").glob("*/retrain.json")).read_text())
            assert doc["train_size"]["after"] == doc["train_size"]["before"] + added
            assert doc["added"][0]["n"] == added
            cmp = json.loads((tmp_path / "runs" / doc["run"].split("/")[-1] / "comparison" /
                              "comparison.json").read_text())
            assert any(r["test"] == "McNemar exact (paired)" for r in cmp["comparisons"][0]["rows"])
            assert doc["replace"] == (doc["gate"]["passed"] and not doc["regressions"]) and doc["replace"], doc
            assert res.exit_code == 0, res.output
            _keep_artifact({"sent": len(x_adv), "rejected": rejected, "queued": len(queued), "added": added,
                            "retrain": doc, "comparison": cmp["comparisons"][0]["rows"]}, tmp_path)
            _ok(run(cli, ["export", doc["run"], "--defense", "detect", "--out", str(tmp_path / "b2")]))
            swap = c.post("/v1/admin/bundle", json={"path": str(tmp_path / "b2")},
                          headers={"Authorization": f"Bearer {ops}"})
            assert swap.status_code == 200, swap.text
            served = c.get("/v1/model", headers={"Authorization": f"Bearer {ops}"}).json()["bundle_version"]
            assert served == load_bundle(tmp_path / "b2").version != b1.version
    finally:
        server.stop()


def test_retrain_refuses_a_folder_that_is_no_finished_run_and_a_missing_file(tmp_path):
    run = CliRunner().invoke
    res = run(cli, ["retrain", str(tmp_path), "--add", str(tmp_path / "r.npz")])
    assert res.exit_code == 2 and "not a finished safedl run" in res.output
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "results.json").write_text("{}")
    (tmp_path / "runs" / "a" / "safedl-run.json").write_text(json.dumps({"format": "safedl-run"}))
    res = run(cli, ["retrain", str(tmp_path / "runs" / "a"), "--add", str(tmp_path / "missing.npz")])
    assert res.exit_code == 2 and "missing.npz: file not found" in res.output, res.output


def test_field_test_set_is_measured_by_the_baseline_and_compared_only_on_the_same_set(tmp_path):
    from safedl.decide.compare import compare_pair
    from safedl.run import run_assessment

    plain, _, _ = prepare(parse_profile(BASE), base_dir=tmp_path)
    _npz(tmp_path / "field.npz", plain.test.x[:30], plain.test.y[:30])
    prof = parse_profile({**BASE, "dataset": {**BASE["dataset"], "field_test": {"path": "field.npz"}}})
    splits, _, _ = prepare(prof, base_dir=tmp_path)
    assert len(splits.field) == 30 and splits.hashes()["test"] == plain.hashes()["test"] and "field" in splits.hashes()
    assert "field" not in plain.hashes()  # runs without one keep their hashes
    _npz(tmp_path / "bad.npz", torch.rand(2, 3, 8, 8), [0, 1])
    with pytest.raises(DataError, match=r"dataset.field_test .*bad.npz: images of shape \[3, 8, 8\]"):
        prepare(parse_profile({**BASE, "dataset": {**BASE["dataset"], "field_test": {"path": "bad.npz"}}}),
                base_dir=tmp_path)
    _, results = run_assessment(prof, base_dir=tmp_path, run_dir=tmp_path / "run")
    m = results["baseline"]["metrics"]["field_accuracy"]
    assert m["n"] == 30 and 0 <= m["value"] <= 1 and results["data"]["hashes"]["field"] == splits.hashes()["field"]
    other = json.loads(json.dumps(results))
    other["baseline"]["metrics"]["field_accuracy"] = {"value": 0.5, "ci95": [0, 1], "n": 30}
    row = next(r for r in compare_pair(results, other) if r["metric"] == "baseline.field_accuracy")
    assert row["test"] == "McNemar exact (paired)"
    other["data"]["hashes"]["field"] = "another set"
    assert all(r["metric"] != "baseline.field_accuracy" for r in compare_pair(results, other))
