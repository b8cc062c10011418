"""From a run to bundles: each evasion-defense stage saves the system it measured (``save_system``), and
``safedl export`` turns one defense's saved system, or the undefended baseline, into a deployable bundle with the
run's measured metrics in its manifest (``export_from_run``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from safedl.deploy.bundle import export_bundle, load_bundle
from safedl.deploy.detector_guard import DetectorFailurePolicy
from safedl.deploy.drift_reference import DriftReference, compute_reference
from safedl.deploy.output_sanity import OutputSanity
from safedl.deploy.pipeline import SecurePipeline
from safedl.deploy.run_probes import probes_from_run
from safedl.errors import BundleError, UserError
from safedl.rundir import RunDir


def _data_info(splits: Any) -> dict[str, Any]:
    names = splits.train.class_names or [str(i) for i in range(splits.num_classes)]
    return {"name": splits.train.name, "shape": list(splits.shape), "num_classes": splits.num_classes,
            "class_names": list(names)}


def save_system(ctx: Any, system: SecurePipeline, *, name: str, trainer: dict[str, Any] | None,
                metrics: dict[str, Any], against: str, attack_params: dict[str, Any]) -> str:
    """Write the measured system as a bundle under ``RUN_DIR/stages/systems/<name>``; returns its relative path."""
    if not (ctx.model_meta.get("arch") or ctx.model_meta.get("entry_point")):
        return ""  # a TorchScript model is not rebuilt from a spec: such systems are not exportable (yet)
    folder = RunDir(ctx.run_dir).system(name)
    spec = {k: v for k, v in ctx.model_meta.items()}
    if trainer is not None:
        spec["trainer"] = trainer
    export_bundle(system, folder, model_spec=spec, data=_data_info(ctx.splits), overwrite=True,
                  metrics={against: {"metrics": metrics, "attack_params": attack_params}},
                  run={"run_id": ctx.run_dir.name, "against": [against]})
    return ctx.rel(folder)


def _baseline_pipeline(run_dir: Path, results: dict[str, Any]) -> tuple[SecurePipeline, dict[str, Any]]:
    from safedl.deploy.bundle import build_model

    ckpt = RunDir(run_dir).baseline_model
    if not ckpt.is_file():
        raise UserError(f"{ckpt}: not found; the run has no saved baseline model")
    blob = torch.load(ckpt, map_location="cpu", weights_only=True)
    meta = blob["meta"]
    spec = {k: meta[k] for k in ("arch", "arch_params", "in_channels", "num_classes", "image_size", "mean", "std",
                                 "entry_point") if k in meta}
    if not (spec.get("arch") or spec.get("entry_point")):
        raise BundleError(f"{ckpt}: a TorchScript baseline cannot be exported as a bundle yet")
    model = build_model(spec)
    model.load_state_dict(blob["state_dict"])
    data = results.get("data", {})
    pipe = SecurePipeline(model=model.eval(), input_shape=data.get("shape"),
                          batch_size=results["profile"]["evaluation"]["batch_size"])
    return pipe, spec


def run_splits(run_dir: Path, results: dict[str, Any]) -> Any:
    """The splits of a finished run, loaded again from its saved profile (paths saved absolute) and checked against
    the validation split's content hash results.json recorded (UserError when the data changed since)."""
    from safedl.data.source import load_dataset
    from safedl.data.split import stratified_split
    from safedl.profile import load_profile

    profile = load_profile(RunDir(run_dir).profile)
    try:
        data = load_dataset(profile.dataset, base_dir=run_dir)
    except OSError as exc:
        raise UserError(f"{run_dir}: cannot load the run's data set again ({exc})") from None
    splits = stratified_split(data, **profile.split_args)
    expected = (results.get("data", {}).get("hashes") or {}).get("val")
    if expected is not None and splits.val.content_hash() != expected:
        raise UserError(f"{run_dir}: the validation split's content hash is {splits.val.content_hash()[:12]}, but "
                        f"the run recorded {expected[:12]}: the data changed since the run (rerun it, or export "
                        "without --output-sanity and with --no-drift-reference)")
    return splits


def _reference(splits: Any, results: dict[str, Any], pipe: SecurePipeline) -> DriftReference:
    x, y = splits.val.x, splits.val.y
    return compute_reference(pipe.model, x, y, num_classes=int(results.get("data", {}).get("num_classes")
                                                                or int(y.max()) + 1), seed=0)


def export_from_run(run_dir: str | Path, *, out: str | Path, defense: str | None = None,
                    signing_key: bytes | None = None, detector_failure: DetectorFailurePolicy | None = None,
                    output_sanity: OutputSanity | None = None, drift_reference: bool = True,
                    probes: int = 200) -> Path:
    """Export the system of defense ``defense`` (its id in the run), or the undefended baseline when None;
    ``detector_failure``: the served system's detector failure policy (default: fail_closed); ``output_sanity``:
    an unfitted check, fitted here on the run's training and validation images (default: none); with
    ``drift_reference`` the bundle carries the bare model's features and labels on the run's validation split;
    ``probes`` > 0: the bundle carries a probe set of at most that many images per source (deploy/run_probes.py)."""
    from safedl.report.render import load_results

    run_dir = Path(run_dir)
    policy = detector_failure or DetectorFailurePolicy()
    results = load_results(RunDir(run_dir).results)
    splits = run_splits(run_dir, results) if output_sanity is not None or drift_reference or probes > 0 else None
    sanity = output_sanity.fit(splits.train.x, splits.val.x) if output_sanity is not None else None
    options = {"signing_key": signing_key, "detector_failure": policy, "output_sanity": sanity,
               "probes": probes_from_run(run_dir, results, splits, n=probes) if probes > 0 else None}
    run = {"run_id": results.get("run_id", run_dir.name), "profile_name": results["profile"].get("name")}
    if defense is None:
        pipe, spec = _baseline_pipeline(run_dir, results)
        metrics = {"baseline": results["baseline"]["metrics"]}
        metrics.update({a["id"]: {"metrics": a["metrics"], "attack_params": a.get("params", {})}
                        for a in results.get("attacks", []) if a.get("category") == "evasion"})
        data = dict(results.get("data", {}))
        data.setdefault("class_names", [str(i) for i in range(int(data.get("num_classes", 0)))])
        return export_bundle(pipe, out, model_spec=spec, data=data, metrics=metrics,
                             run=dict(run, defense=None, against=sorted(metrics.keys() - {"baseline"})),
                             drift=_reference(splits, results, pipe) if drift_reference else None, **options)
    entries = [d for d in results.get("defenses", []) if d.get("id") == defense]
    if not entries:
        ids = sorted({d.get("id") for d in results.get("defenses", [])})
        raise UserError(f"--defense {defense!r}: no such defense in {RunDir(run_dir).results}; its defenses are: "
                        f"{', '.join(ids) or '(none)'} (or use --baseline)")
    saved = [d for d in entries if d.get("system")]
    if not saved:
        raise UserError(f"--defense {defense!r}: only evasion defenses measured on a zoo or entry-point model are "
                        "exportable; this one has no saved system")
    bundle = load_bundle(run_dir / saved[0]["system"])
    attack_params = {a["id"]: a.get("params", {}) for a in results.get("attacks", [])}
    metrics = {d["against"]: {"metrics": d["metrics"], "attack_params": attack_params.get(d["against"], {})}
               for d in saved}
    return export_bundle(bundle.pipeline, out, model_spec={k: v for k, v in bundle.manifest["model"].items()
                                                           if k != "file"},
                         data=bundle.manifest["data"], metrics=metrics,
                         run=dict(run, defense=defense, against=[d["against"] for d in saved]),
                         drift=_reference(splits, results, bundle.pipeline) if drift_reference else None, **options)
