"""SecurePipeline and bundles: a run's measured system is exported, verified, reloaded in a new process and gives
exactly the run's numbers; any tampering is refused with a message naming the file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from safedl import registry
from safedl.cli import app
from safedl.deploy import SecurePipeline, load_bundle
from safedl.errors import BundleError, ConfigError
from _profiles import tiny_profile

PROFILE = tiny_profile(
    name="tinydeploy", training={"epochs": 3},
    attacks={"evasion": [{"name": "pgd", "params": {"eps": 0.2, "steps": 5}}]},
    defenses=[
        {"name": "feature_squeezing", "params": {"bit_depth": 2}, "against": ["pgd"]},
        {"id": "squeeze_and_detect", "against": ["pgd"],
         "pipeline": [{"name": "feature_squeezing", "params": {"bit_depth": 2}},
                      {"name": "feature_squeezing_detector", "params": {"bit_depth": 2, "fpr": 0.1}}]},
    ],
    evaluation={"n_eval": 120},
    output={"dir": "runs", "html": False, "figures": False},
)

RELOAD = """
import json, sys, torch
from safedl.data import load_builtin, stratified_split
from safedl.deploy import load_bundle
b = load_bundle(sys.argv[1])
s = stratified_split(load_builtin("digits"), test_fraction=0.2, val_fraction=0.1, seed=0)
x, y = s.test.x[:120], s.test.y[:120]
d = b.pipeline.decide(x)
print(json.dumps({"correct": int(d.accepted_correct(y).sum()), "rejected": int(d.rejected.sum()),
                  "version": b.version}))
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy")
    prof = tmp / "p.yaml"
    prof.write_text(yaml.safe_dump(PROFILE))
    res = CliRunner().invoke(app, ["run", str(prof), "--runs-dir", str(tmp / "runs"), "--no-progress", "-q"])
    run = next((tmp / "runs").iterdir())
    gate = json.loads((run / "results.json").read_text())["gate"]
    assert res.exit_code == (0 if gate["passed"] or not gate.get("configured", True) else 1), res.output
    return run


def _export(run_dir: Path, out: Path, *args: str):
    return CliRunner().invoke(app, ["export", str(run_dir), "--out", str(out), *args])


def _reload_in_new_process(bundle: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    out = subprocess.run([sys.executable, "-c", RELOAD, str(bundle)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("defense", ["feature_squeezing", "squeeze_and_detect", None])
def test_exported_bundle_reproduces_the_run_in_a_new_process(run_dir, tmp_path, defense):
    results = json.loads((run_dir / "results.json").read_text())
    args = ["--defense", defense] if defense else ["--baseline"]
    res = _export(run_dir, tmp_path / "b", *args)
    assert res.exit_code == 0, res.output
    got = _reload_in_new_process(tmp_path / "b")
    if defense is None:
        acc = next(a for a in results["attacks"] if a["id"] == "pgd")["metrics"]["clean_accuracy"]
        assert got["correct"] == round(acc["value"] * acc["n"]) and got["rejected"] == 0
        return
    m = next(d for d in results["defenses"] if d["id"] == defense)["metrics"]
    assert got["correct"] == round(m["clean_accuracy"]["value"] * m["clean_accuracy"]["n"])
    expected_rejected = round(m["clean_rejection_rate"]["value"] * 120) if "clean_rejection_rate" in m else 0
    assert got["rejected"] == expected_rejected
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["metrics"]["pgd"]["metrics"]["robust_accuracy"] == m["robust_accuracy"]
    assert [c["name"] for c in manifest["components"]][0] == "feature_squeezing"


def test_detector_rejects_and_names_itself(run_dir, tmp_path):
    assert _export(run_dir, tmp_path / "b", "--defense", "squeeze_and_detect").exit_code == 0
    b = load_bundle(tmp_path / "b")
    noise = torch.rand(40, 1, 8, 8)  # uniform noise is far from every digit
    d = b.pipeline.decide(noise)
    assert set(d.detector_scores) == {"feature_squeezing_detector"}
    flagged = d.detector_scores["feature_squeezing_detector"] > d.thresholds["feature_squeezing_detector"]
    assert torch.equal(d.rejected, flagged)
    assert all((r == "detector:feature_squeezing_detector") == bool(f) for r, f in zip(d.reasons, flagged))


@pytest.fixture()
def bundle(run_dir, tmp_path):
    path = tmp_path / "b"
    assert _export(run_dir, path, "--defense", "squeeze_and_detect").exit_code == 0
    load_bundle(path)  # valid before tampering
    return path


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def test_every_flipped_byte_is_refused_naming_the_file(bundle):
    for f in _files(bundle):
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
        with pytest.raises(BundleError) as err:
            load_bundle(bundle)
        assert f.name in str(err.value)
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
    load_bundle(bundle)


def test_deleted_truncated_or_extra_files_are_refused(bundle):
    state = next(p for p in _files(bundle / "state"))
    saved = state.read_bytes()
    state.write_bytes(saved[: len(saved) // 2])
    with pytest.raises(BundleError, match=state.name):
        load_bundle(bundle)
    state.unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(bundle)
    state.write_bytes(saved)
    (bundle / "extra.py").write_text("print('hi')")
    with pytest.raises(BundleError, match="extra.py"):
        load_bundle(bundle)


def _rewrite_manifest(bundle: Path, edit) -> None:
    """Edit the manifest AND recompute its digest, as an attacker with write access would."""
    import hashlib

    m = json.loads((bundle / "manifest.json").read_text())
    edit(m)
    text = json.dumps(m)
    (bundle / "manifest.json").write_text(text)
    (bundle / "manifest.sha256").write_text(f"sha256 {hashlib.sha256(text.encode()).hexdigest()}\n")


def test_edited_manifest_and_foreign_schema_are_refused(bundle):
    text = (bundle / "manifest.json").read_text()
    (bundle / "manifest.json").write_text(text.replace('"bit_depth": 2', '"bit_depth": 1', 1))
    with pytest.raises(BundleError, match="manifest.json"):
        load_bundle(bundle)
    (bundle / "manifest.json").write_text(text)
    _rewrite_manifest(bundle, lambda m: m.update(bundle_schema_version=99))
    with pytest.raises(BundleError, match="schema version 99"):
        load_bundle(bundle)


def test_pickled_payload_is_refused_even_with_matching_hashes(bundle, tmp_path):
    import hashlib

    weights = bundle / "model.safetensors"
    torch.save({"w": torch.zeros(3)}, weights)  # a pickle-based file in place of the tensors
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    _rewrite_manifest(bundle, lambda m: m["files"].update({"model.safetensors": digest}))
    with pytest.raises(BundleError, match="pickled payload"):
        load_bundle(bundle)


def test_signed_bundle_needs_the_right_key(run_dir, tmp_path):
    key = tmp_path / "key"
    key.write_bytes(b"0123456789abcdef-secret")
    assert _export(run_dir, tmp_path / "s", "--baseline", "--signing-key-file", str(key)).exit_code == 0
    load_bundle(tmp_path / "s", signing_key=key.read_bytes())
    with pytest.raises(BundleError, match="signature"):
        load_bundle(tmp_path / "s", signing_key=b"another-key-0123456789")
    assert CliRunner().invoke(app, ["verify", str(tmp_path / "s"), "--signing-key-file", str(key)]).exit_code == 0


def test_cli_errors_exit_2_and_write_nothing(run_dir, tmp_path):
    res = _export(run_dir, tmp_path / "x", "--defense", "nope")
    assert res.exit_code == 2 and "squeeze_and_detect" in res.output and not (tmp_path / "x").exists()
    assert _export(run_dir, tmp_path / "x").exit_code == 2
    (tmp_path / "exists").mkdir()
    assert _export(run_dir, tmp_path / "exists", "--baseline").exit_code == 2
    res = CliRunner().invoke(app, ["verify", str(tmp_path / "exists")])
    assert res.exit_code == 2 and "manifest.json" in res.output


# ---------------------------------------------------------------------------------------------- the pipeline

def test_decide_is_deterministic_and_thread_safe_with_randomized_preprocessing(tiny_model, eval_batch):
    x, _ = eval_batch
    noise = registry.create("preprocessor", "gaussian_augmentation", sigma=0.3, seed=3)
    pipe = SecurePipeline(model=tiny_model, preprocessors=[noise])
    first = pipe.decide(x)
    assert torch.equal(first.probs, pipe.decide(x).probs)  # the seeded noise restarts at every decision
    outs: list = []
    threads = [threading.Thread(target=lambda: outs.append(pipe.decide(x).probs)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(o, first.probs) for o in outs)


def test_postprocessors_harden_the_output_but_keep_the_label(tiny_model, eval_batch):
    x, _ = eval_batch
    plain = SecurePipeline(model=tiny_model).decide(x)
    labels_only = SecurePipeline(model=tiny_model,
                                 postprocessors=[registry.create("postprocessor", "class_labels")]).decide(x)
    assert torch.equal(plain.labels, labels_only.labels)
    assert torch.allclose(plain.probs.sum(1), torch.ones(len(x)), atol=1e-5)
    assert set(labels_only.probs.round(decimals=6).unique().tolist()) <= {0.0, 1.0}


def test_certifier_with_preprocessors_is_refused(tiny_model):
    cert = registry.create("certifier", "randomized_smoothing", n=20, n0=10)
    with pytest.raises(ConfigError, match="certifier"):
        SecurePipeline(model=tiny_model, certifier=cert,
                       preprocessors=[registry.create("preprocessor", "feature_squeezing")])
    with pytest.raises(ConfigError, match="not a detector"):
        SecurePipeline(model=tiny_model, detectors=[object()])


def test_wrong_image_shape_is_an_error(tiny_model):
    pipe = SecurePipeline(model=tiny_model, input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"\(1, 8, 8\)"):
        pipe.decide(torch.rand(2, 3, 8, 8))


def test_headline_robust_accuracy_includes_the_strong_adaptive_suite(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    m = next(d for d in results["defenses"] if d["id"] == "feature_squeezing")["metrics"]
    assert m["strong_suite_budget"]["steps"] == 100 and m["strong_suite_budget"]["restarts"] == 3
    assert m["strong_suite_budget"]["eps"] == 0.2 and m["strong_suite_budget"]["members"][:2] == ["apgd_ce", "apgd_dlr"]
    parts = [m[k]["value"] for k in ("robust_accuracy_strong_suite", "robust_accuracy_paired_adaptive",
                                     "robust_accuracy_nonadaptive")]
    assert m["robust_accuracy"]["value"] <= min(parts)
    # on bit-depth squeezing PGD-5 through BPDA is weak: the suite must find at least as many adversarial examples
    assert m["robust_accuracy_strong_suite"]["value"] <= m["robust_accuracy_paired_adaptive"]["value"]


def test_export_records_the_detector_failure_policy_and_fits_the_output_sanity_on_the_run(run_dir, tmp_path):
    res = _export(run_dir, tmp_path / "b", "--defense", "squeeze_and_detect", "--detector-failure", "fail_open",
                  "--detector-timeout-s", "2", "--output-sanity", "--sanity-quantile", "0.99")
    assert res.exit_code == 0, res.output
    b = load_bundle(tmp_path / "b")
    assert b.manifest["detector_failure"] == {"policy": "fail_open", "timeout_s": 2.0}
    from safedl.data import load_builtin, stratified_split

    s = stratified_split(load_builtin("digits"), test_fraction=0.2, val_fraction=0.1, seed=0)
    check = b.pipeline.output_sanity
    assert check is not None and b.manifest["output_sanity"]["n_calibration"] == len(s.val.x)
    assert int((check.distance(s.val.x) > check.distance_threshold_).sum()) <= int(0.01 * len(s.val.x)) + 1
    assert torch.allclose(check.mean_, s.train.x.flatten(1).mean(0))
    plain = _export(run_dir, tmp_path / "p", "--defense", "squeeze_and_detect")
    assert plain.exit_code == 0 and load_bundle(tmp_path / "p").manifest["output_sanity"] is None
