"""`safedl run --mlflow URI` and `safedl export --register NAME --mlflow URI`, offline against a local
sqlite:///PATH/mlflow.db store: parameters, every metric, the gate, artifacts and hash tags; the bundle registered
as a model version with its verification manifest. Skipped without MLflow (a failure under CI: the dev extra
installs it)."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import yaml
from typer.testing import CliRunner

from _profiles import tiny_profile
from safedl.cli import app

if importlib.util.find_spec("mlflow") is None:
    if os.environ.get("CI"):
        pytest.fail("mlflow is not installed but CI is set: `make install` installs the dev extra, which has it",
                    pytrace=False)
    pytest.skip("needs mlflow (pip install 'safedl[mlflow]'); CI=1 makes this a failure", allow_module_level=True)

PROFILE = tiny_profile(name="tinytrack", training={"epochs": 1},
                       attacks={"evasion": [{"name": "fgsm", "params": {"eps": 0.2}}]},
                       defenses=[{"name": "feature_squeezing", "params": {"bit_depth": 2}, "against": ["fgsm"]}],
                       output={"dir": "runs", "html": True, "figures": False})


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow")
    prof = tmp / "p.yaml"
    prof.write_text(yaml.safe_dump(PROFILE))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    res = CliRunner().invoke(app, ["run", str(prof), "--runs-dir", str(tmp / "runs"), "--no-progress", "-q",
                                   "--mlflow", uri])
    assert res.exit_code == 0, res.output  # no evaluation.gate thresholds: not configured, exit 0
    return tmp, uri, next((tmp / "runs").iterdir()), res.output


def test_run_logs_params_metrics_gate_artifacts_and_hashes(tracked):
    import mlflow

    tmp, uri, run_dir, output = tracked
    results = json.loads((run_dir / "results.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tinytrack")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_id in output and run.info.status == "FINISHED"
    assert run.data.params["dataset.name"] == "digits" and run.data.params["attacks.evasion.0.params.eps"] == "0.2"
    m = run.data.metrics
    assert m["baseline.clean_accuracy"] == results["baseline"]["metrics"]["clean_accuracy"]["value"]
    fgsm = next(a for a in results["attacks"] if a["id"] == "fgsm")
    assert m["attack.fgsm.robust_accuracy"] == fgsm["metrics"]["robust_accuracy"]["value"]
    fs = results["defenses"][0]
    assert m[f"defense.{fs['id']}.fgsm.robust_accuracy"] == fs["metrics"]["robust_accuracy"]["value"]
    assert m[f"defense.{fs['id']}.fgsm.robust_accuracy.n"] == fs["metrics"]["robust_accuracy"]["n"]
    assert m["gate.passed"] == float(results["gate"]["passed"])
    tags = run.data.tags
    assert tags["data.hash.val"] == results["data"]["hashes"]["val"]
    assert tags["gate.passed"] == str(results["gate"]["passed"]).lower()
    digest = (run_dir / "stages" / "systems").glob("*/manifest.sha256")
    assert any(tags[f"bundle.sha256.{p.parent.name}"] == p.read_text().split()[1] for p in digest)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "report.html"} <= names
    assert (tmp / "mlartifacts").is_dir()  # a sqlite store keeps its artifacts next to the database


def test_export_registers_the_verified_bundle_as_a_model_version(tracked):
    import mlflow

    tmp, uri, run_dir, _ = tracked
    out = tmp / "bundle"
    res = CliRunner().invoke(app, ["export", str(run_dir), "--baseline", "--out", str(out), "--register", "digits-cnn",
                                   "--mlflow", uri])
    assert res.exit_code == 0, res.output
    client = mlflow.MlflowClient(tracking_uri=uri)
    (mv,) = client.search_model_versions("name='digits-cnn'")
    digest = (out / "manifest.sha256").read_text().split()[1]
    assert mv.tags["safedl.manifest_sha256"] == digest and mv.tags["safedl.drift_reference"] == "true"
    files = {a.path for a in client.list_artifacts(mv.run_id, "bundle")}
    assert {"bundle/manifest.json", "bundle/manifest.sha256", "bundle/model.safetensors"} <= files


def test_register_without_mlflow_uri_is_refused_before_writing(tracked):
    tmp, _, run_dir, _ = tracked
    res = CliRunner().invoke(app, ["export", str(run_dir), "--baseline", "--out", str(tmp / "b2"), "--register", "x"])
    assert res.exit_code == 2 and "go together" in res.output and not (tmp / "b2").exists()


def test_a_tampered_bundle_is_not_registered(tracked, tmp_path):
    from safedl.errors import BundleError
    from safedl.tracking.mlflow_store import register_bundle

    tmp, uri, run_dir, _ = tracked
    out = tmp_path / "b"
    assert CliRunner().invoke(app, ["export", str(run_dir), "--baseline", "--out", str(out)]).exit_code == 0
    (out / "model.safetensors").write_bytes(b"x")
    with pytest.raises(BundleError, match="model.safetensors"):
        register_bundle(out, name="tampered", uri=uri)
