"""safedl export stores a drift reference in the bundle: the validation split's penultimate features and label
distributions, hashed in the manifest like every other file, refused when tampered with."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from _profiles import tiny_profile
from safedl.cli import app
from safedl.data import load_builtin, stratified_split
from safedl.deploy import load_bundle
from safedl.deploy.drift_reference import FILE
from safedl.errors import BundleError
from safedl.models.features import extract_features

PROFILE = tiny_profile(name="tinydrift", training={"epochs": 1}, baseline_only=True,
                       output={"dir": "runs", "html": False, "figures": False})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("drift")
    prof = tmp / "p.yaml"
    prof.write_text(yaml.safe_dump(PROFILE))
    res = CliRunner().invoke(app, ["run", str(prof), "--runs-dir", str(tmp / "runs"), "--no-progress", "-q"])
    assert res.exit_code == 0, res.output  # no evaluation.gate thresholds: not configured, exit 0
    return next((tmp / "runs").iterdir())


@pytest.fixture(scope="module")
def bundle_dir(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "bundle"
    res = CliRunner().invoke(app, ["export", str(run_dir), "--baseline", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_reference_is_the_validation_split(bundle_dir):
    b = load_bundle(bundle_dir)
    val = stratified_split(load_builtin("digits"), test_fraction=0.2, val_fraction=0.1, seed=0).val
    ref = b.drift
    assert ref is not None and len(ref.features) == len(val)
    assert torch.equal(ref.labels, val.y)
    assert torch.allclose(ref.features, extract_features(b.pipeline.model, val.x), atol=1e-5)
    with torch.no_grad():
        assert torch.equal(ref.pred_labels, b.pipeline.model(val.x).argmax(1))
    entry = b.manifest["drift"]
    assert entry["label_counts"] == torch.bincount(val.y, minlength=10).tolist()
    assert entry["pred_counts"] == torch.bincount(ref.pred_labels, minlength=10).tolist()
    assert entry["dim"] == ref.features.shape[1] and entry["n"] == len(val)
    assert FILE in b.manifest["files"]


def test_tampered_reference_is_refused(bundle_dir, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    data = bytearray((copy / FILE).read_bytes())
    data[-1] ^= 1
    (copy / FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="reference.safetensors"):
        load_bundle(copy)


def test_no_drift_reference(run_dir, tmp_path):
    out = tmp_path / "b"
    res = CliRunner().invoke(app, ["export", str(run_dir), "--baseline", "--out", str(out), "--no-drift-reference"])
    assert res.exit_code == 0, res.output
    b = load_bundle(out)
    assert b.drift is None and "drift" not in json.loads((out / "manifest.json").read_text())


def test_changed_data_is_refused(run_dir, tmp_path):
    res_path = run_dir / "results.json"
    original = res_path.read_text()
    results = json.loads(original)
    results["data"]["hashes"]["val"] = "0" * 64
    res_path.write_text(json.dumps(results))
    try:
        res = CliRunner().invoke(app, ["export", str(run_dir), "--baseline", "--out", str(tmp_path / "b")])
    finally:
        res_path.write_text(original)
    assert res.exit_code == 2 and "validation split" in res.output and not (tmp_path / "b").exists()
