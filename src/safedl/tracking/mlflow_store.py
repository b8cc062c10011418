"""MLflow tracking of safedl runs and bundles (``pip install 'safedl[mlflow]'``).

- :func:`log_run`: one MLflow run per safedl run directory, in the experiment named after the profile: the resolved
  profile as parameters, every metric of results.json (``safedl.tracking.flatten``), the gate outcome, the data's
  content hashes and every saved bundle's manifest sha256 as tags, report.html / report.md / results.json as
  artifacts.
- :func:`register_bundle`: verifies a bundle (``load_bundle``), logs its files (manifest.json and manifest.sha256,
  the verification manifest, included) as the artifacts of a run in the experiment ``safedl-bundles``, and registers
  them as a new version of the registered model ``name``, tagged with the bundle's version and manifest sha256.

A ``sqlite:///PATH`` store keeps its artifacts next to the database (``PATH``'s folder / ``mlartifacts``), so it
works offline from any working directory; any other URI uses the server's artifact store.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from safedl.errors import UserError
from safedl.tracking.flatten import flat_metrics, flat_params, metric_values, run_tags

log = logging.getLogger("safedl.tracking")
BUNDLE_EXPERIMENT = "safedl-bundles"


def require_mlflow() -> Any:
    """The mlflow module; UserError (exit 2) when safedl[mlflow] is not installed."""
    try:
        import mlflow
    except ImportError:
        raise UserError("--mlflow needs MLflow: pip install 'safedl[mlflow]'") from None
    return mlflow


def _client(uri: str) -> Any:
    mlflow = require_mlflow()
    if not isinstance(uri, str) or not uri.strip():
        raise UserError("--mlflow: give a tracking URI (e.g. sqlite:///PATH/mlflow.db or http://HOST:5000)")
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri)


def _experiment(client: Any, uri: str, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def log_run(run_dir: str | Path, *, uri: str, experiment: str | None = None) -> str:
    """Record the finished run ``run_dir`` in the MLflow store ``uri``; returns the MLflow run id."""
    from mlflow.entities import Metric, Param, RunTag

    from safedl.report.render import load_results
    from safedl.rundir import RunDir

    layout = RunDir(run_dir)
    results = load_results(layout.results)
    client = _client(uri)
    exp_id = _experiment(client, uri, experiment or str(results["profile"].get("name") or "safedl"))
    bundles = {p.parent.name: p.read_text(encoding="utf-8").split()[1]
               for p in sorted((layout.stages / "systems").glob("*/manifest.sha256"))} \
        if (layout.stages / "systems").is_dir() else {}
    tags = run_tags(results, bundles)
    run = client.create_run(exp_id, run_name=layout.name, tags={"mlflow.runName": layout.name, **tags})
    rid = run.info.run_id
    try:
        params = [Param(k, v) for k, v in flat_params(results["profile"]).items()]
        for chunk in _chunks(params, 100):
            client.log_batch(rid, params=chunk)
        metrics = [Metric(k, v, 0, 0) for k, v in flat_metrics(results).items()]
        for chunk in _chunks(metrics, 1000):
            client.log_batch(rid, metrics=chunk)
        client.log_batch(rid, tags=[RunTag("safedl.run_dir", str(layout.path.resolve()))])
        for path in (layout.results, layout.report_html, layout.report_md):
            if path.is_file():
                client.log_artifact(rid, str(path))
        client.set_terminated(rid, "FINISHED")
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    log.info("logged run %s to MLflow %s (run %s: %d params, %d metrics)", layout.name, uri, rid, len(params),
             len(metrics))
    return rid


def register_bundle(bundle_dir: str | Path, *, name: str, uri: str, signing_key: bytes | None = None) -> str:
    """Register the verified bundle ``bundle_dir`` as a new version of model ``name``; returns the version."""
    from safedl.deploy import load_bundle

    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir, signing_key=signing_key)  # refuses anything unverified (BundleError, exit 2)
    client = _client(uri)
    digest = (bundle_dir / "manifest.sha256").read_text(encoding="utf-8").split()[1]
    run_info = bundle.manifest.get("run", {})
    tags = {"safedl.bundle_version": bundle.version, "safedl.manifest_sha256": digest,
            "safedl.run_id": str(run_info.get("run_id", "")), "safedl.defense": str(run_info.get("defense")),
            "safedl.drift_reference": str(bundle.drift is not None).lower()}
    exp_id = _experiment(client, uri, BUNDLE_EXPERIMENT)
    run = client.create_run(exp_id, run_name=f"{name}-{bundle.version}", tags=tags)
    rid = run.info.run_id
    from mlflow.entities import Metric

    client.log_artifacts(rid, str(bundle_dir), artifact_path="bundle")
    measured = {}
    for against, m in (bundle.manifest.get("metrics") or {}).items():  # what the run measured for this system
        measured.update(metric_values((against,), m.get("metrics", m) if isinstance(m, dict) else {}))
    if measured:
        client.log_batch(rid, metrics=[Metric(k, v, 0, 0) for k, v in measured.items()])
    client.set_terminated(rid, "FINISHED")
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - MLflow raises its own RESOURCE_DOES_NOT_EXIST error
        client.create_registered_model(name, description="safedl bundles (verified; manifest.json and "
                                                          "manifest.sha256 in each version's artifacts)")
    source = f"{client.get_run(rid).info.artifact_uri}/bundle"
    mv = client.create_model_version(name, source=source, run_id=rid, tags=tags,
                                     description=f"safedl bundle {bundle.version} (manifest sha256 {digest})")
    log.info("registered bundle %s as %s version %s in MLflow %s", bundle.version, name, mv.version, uri)
    return str(mv.version)
