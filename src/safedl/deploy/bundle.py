"""Deployment bundles: the defended system of one evaluated defense as a verified directory.

    BUNDLE/
      manifest.json     schema version, versions, run id, data shape and class names, the model's architecture,
                        every component (kind, registry name, constructor params, fitted scalars), the sha256 of
                        every other file, and the run's measured metrics for this system
      manifest.sha256   sha256 of manifest.json (and, with a signing key, an HMAC-SHA256 of it)
      model.safetensors the model's weights
      state/NN-name.safetensors  fitted tensors of component NN (e.g. a detector's statistics)

Tensors are stored as safetensors, so a bundle holds no pickled code; ``load_bundle`` reads every file once
(``safedl.deploy.verify``: no symbolic links, regular files only, bounded size), verifies the schema, the manifest
digest (and signature when a key is given) and every file's sha256 over those bytes before anything is built,
builds the system from the same bytes, and refuses any mismatch with a :class:`~safedl.errors.BundleError` naming
the file.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import safedl
from safedl import registry
from safedl.deploy.detector_guard import DetectorFailurePolicy
from safedl.deploy.output_sanity import OutputSanity
from safedl.deploy.drift_reference import FILE as DRIFT_FILE
from safedl.deploy.drift_reference import DriftReference, reference_from_tensors
from safedl.deploy.pipeline import SecurePipeline
from safedl.deploy.probes import FILE as PROBES_FILE
from safedl.deploy.probes import ProbeSet, probes_of_verified
from safedl.deploy.state import fitted_state, restore_state
from safedl.deploy.verify import (DIGEST, KIND, MANIFEST, SCHEMA_VERSION, WEIGHTS, VerifiedBundle,
                                  read_verified_bundle)
from safedl.errors import BundleError, UserError
from safedl.utils.io import file_sha256

log = logging.getLogger("safedl.deploy.bundle")
SANITY_STATE = "state/output_sanity.safetensors"


@dataclass
class Bundle:
    """A loaded, verified bundle: its directory, manifest, the rebuilt pipeline and a short version id."""

    path: Path
    manifest: dict[str, Any]
    pipeline: SecurePipeline
    version: str
    drift: DriftReference | None = None  # the reference the service tests its traffic against (None: not exported)
    probes: ProbeSet | None = None  # the labelled probe set (deploy/probes.py; None: exported without one)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    # clone: safetensors refuses tensors that share storage (e.g. tied weights)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))


def _load_tensors(verified: VerifiedBundle, rel: str) -> dict[str, torch.Tensor]:
    """The tensors of the verified file ``rel``, parsed from the bytes that were verified (never re-read)."""
    from safetensors.torch import load

    path = verified.root / rel
    data = verified.files.get(rel)
    if data is None:
        raise BundleError(f"{path}: not listed in the manifest's files, so it is not verified; refused")
    if data[:1] == b"\x80" or data[:2] == b"PK":
        raise BundleError(f"{path}: holds a pickled payload (torch.save / pickle); bundles store tensors as "
                          f"safetensors only and this file ({rel}) is refused, never executed")
    try:
        return load(data)
    except Exception as exc:  # a malformed header
        raise BundleError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def _component_record(index: int, comp: Any, folder: Path) -> dict[str, Any]:
    try:
        params = registry.creation_params(comp)
    except UserError as exc:
        raise BundleError(f"cannot export: {exc}") from None
    tensors, meta = fitted_state(comp)
    rec: dict[str, Any] = {"kind": comp.registry_kind, "name": comp.registry_name,
                           "params": params, "fitted": meta, "state": None}
    if tensors:
        rel = f"state/{index:02d}-{comp.registry_name}.safetensors"
        (folder / "state").mkdir(exist_ok=True)
        _save_tensors(folder / rel, tensors)
        rec["state"] = rel
    return rec


def export_bundle(pipeline: SecurePipeline, out: str | Path, *, model_spec: dict[str, Any], data: dict[str, Any],
                  metrics: dict[str, Any] | None = None, run: dict[str, Any] | None = None,
                  signing_key: bytes | None = None, overwrite: bool = False,
                  detector_failure: DetectorFailurePolicy | None = None,
                  output_sanity: OutputSanity | None = None, drift: DriftReference | None = None,
                  probes: ProbeSet | None = None) -> Path:
    """Write ``pipeline`` as a bundle directory at ``out`` (atomically: a temporary folder renamed at the end).

    ``model_spec``: how to rebuild the model's architecture (a zoo ``arch`` with its checkpoint metadata, or an
    ``entry_point``; optional ``trainer`` whose ``architecture`` transform the weights need); ``data``: name,
    shape (C, H, W), num_classes, class_names; ``metrics``: what the run measured for this system; ``run``: run id
    and what the system was evaluated against; ``detector_failure``: what the served system does when a detector
    fails (deploy/detector_guard.py; default: the pipeline's, else fail_closed); ``output_sanity``: a fitted
    output sanity check (deploy/output_sanity.py; default: the pipeline's, else none); ``drift``: the drift
    reference (``drift/reference.safetensors``, hashed with the other files, summarized in the manifest's ``drift``
    section); ``probes``: the labelled probe set (``probes/probes.safetensors``, deploy/probes.py).
    """
    policy = detector_failure or pipeline.detector_failure or DetectorFailurePolicy()
    sanity = output_sanity or pipeline.output_sanity
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: exists; choose another --out or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _save_tensors(tmp / WEIGHTS, pipeline.model.state_dict())
        components = [_component_record(i, c, tmp) for i, c in enumerate(pipeline.components)]
        sanity_rec = _sanity_record(sanity, tmp) if sanity is not None else None
        if drift is not None:
            (tmp / DRIFT_FILE).parent.mkdir(exist_ok=True)
            _save_tensors(tmp / DRIFT_FILE, drift.tensors())
        if probes is not None:
            (tmp / PROBES_FILE).parent.mkdir(exist_ok=True)
            _save_tensors(tmp / PROBES_FILE, probes.tensors())
        files = {p.relative_to(tmp).as_posix(): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "bundle_schema_version": SCHEMA_VERSION, "kind": KIND,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"safedl": safedl.__version__, "torch": torch.__version__},
            "run": run or {}, "data": data, "model": dict(model_spec, file=WEIGHTS),
            "components": components, "batch_size": pipeline.batch_size,
            "detector_failure": policy.to_manifest(), "output_sanity": sanity_rec,
            "files": files, "metrics": metrics or {},
        }
        if drift is not None:
            manifest["drift"] = drift.manifest_entry()
        if probes is not None:
            manifest["probes"] = probes.manifest_entry()
        text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False)
        (tmp / MANIFEST).write_text(text, encoding="utf-8")
        (tmp / DIGEST).write_text(_digest_text(text.encode(), signing_key), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _sanity_record(sanity: OutputSanity, folder: Path) -> dict[str, Any]:
    meta, tensors = sanity.to_record()
    (folder / "state").mkdir(exist_ok=True)
    _save_tensors(folder / SANITY_STATE, tensors)
    return dict(meta, state=SANITY_STATE)


def _load_sanity(verified: VerifiedBundle) -> OutputSanity | None:
    rec = verified.manifest.get("output_sanity")
    if rec is None:
        return None
    where = str(verified.root / MANIFEST)
    if not isinstance(rec, dict) or rec.get("state") != SANITY_STATE:
        raise BundleError(f"{where}: output_sanity must name its state file {SANITY_STATE}")
    return OutputSanity.from_record(rec, _load_tensors(verified, SANITY_STATE), where=where)


def _digest_text(manifest_bytes: bytes, key: bytes | None) -> str:
    lines = [f"sha256 {hashlib.sha256(manifest_bytes).hexdigest()}"]
    if key is not None:
        lines.append(f"hmac-sha256 {hmac.new(key, manifest_bytes, hashlib.sha256).hexdigest()}")
    return "\n".join(lines) + "\n"


def build_model(spec: dict[str, Any]) -> nn.Module:
    """An untrained model of the architecture a bundle's manifest describes."""
    from safedl.models.normalize import with_normalization
    from safedl.models.zoo import build_model as zoo_model

    if spec.get("arch"):
        net = zoo_model(spec["arch"], in_channels=spec["in_channels"], num_classes=spec["num_classes"],
                        image_size=spec["image_size"], **spec.get("arch_params", {}))
        model = with_normalization(net, spec["mean"], spec["std"])
    elif spec.get("entry_point"):
        from safedl.models.user import load_entry_point

        model = load_entry_point(spec["entry_point"], **spec.get("arch_params", {}))
    else:
        raise BundleError("manifest model section names neither a zoo 'arch' nor an 'entry_point'")
    trainer = spec.get("trainer")
    if trainer:
        model = registry.create("trainer", trainer["name"], **trainer.get("params", {})).architecture(model)
    return model


def _rebuild(verified: VerifiedBundle, dev: torch.device) -> tuple[nn.Module, dict[str, list[Any]]]:
    """The model and the components by kind, built from the verified manifest and bytes."""
    manifest = verified.manifest
    try:
        model = build_model(manifest["model"])
        model.load_state_dict(_load_tensors(verified, WEIGHTS))
        model = model.to(dev).eval()
        parts: dict[str, list[Any]] = {k: [] for k in ("preprocessor", "detector", "certifier", "postprocessor")}
        for rec in manifest["components"]:
            comp = registry.create(rec["kind"], rec["name"], **rec["params"])
            tensors = _load_tensors(verified, rec["state"]) if rec.get("state") else {}
            restore_state(comp, tensors, rec.get("fitted", {}), dev)
            if rec["kind"] == "detector":
                comp.model_ = model
            parts[rec["kind"]].append(comp)
    except BundleError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, UserError) as exc:
        raise BundleError(f"{verified.root / MANIFEST}: cannot rebuild the system ({type(exc).__name__}: {exc})") \
            from None
    return model, parts


def load_bundle(path: str | Path, *, device: str | torch.device = "cpu", signing_key: bytes | None = None,
                allow_entry_point: bool = True) -> Bundle:
    """Verify a bundle (schema, manifest digest/signature, every file's sha256) and rebuild its pipeline.

    Every file is read once (:func:`safedl.deploy.verify.read_verified_bundle`: no symbolic links, regular files
    only, bounded size) and the system and its version are built from exactly the bytes that were verified, so
    files replaced while this runs can make it fail but never load unverified content.

    A model given as a Python ``entry_point`` runs that function to build it (bundles hold no code, but the
    manifest names what to call and with which arguments): ``allow_entry_point=False`` refuses such a bundle
    before anything runs (for bundles from a less trusted source than the operator, e.g. an admin swap without a
    signing key).
    """
    root = Path(path)
    verified = read_verified_bundle(root, signing_key=signing_key)
    manifest = verified.manifest
    if not allow_entry_point and isinstance(manifest.get("model"), dict) and manifest["model"].get("entry_point"):
        raise BundleError(f"{root / MANIFEST}: the model is built by the Python entry point "
                          f"{manifest['model']['entry_point']!r}, which is not run for an unsigned bundle here "
                          "(sign it and start the server with --signing-key-file)")
    try:  # absent (a bundle from before the policy): fail_closed
        policy = DetectorFailurePolicy.from_manifest(manifest.get("detector_failure"), where=str(root / MANIFEST))
    except UserError as exc:
        raise BundleError(str(exc)) from None
    model, parts = _rebuild(verified, torch.device(device))
    sanity = _load_sanity(verified)
    data = manifest.get("data", {})
    pipe = SecurePipeline(model=model, preprocessors=[p.to(torch.device(device)) for p in parts["preprocessor"]],
                          detectors=parts["detector"], postprocessors=parts["postprocessor"],
                          certifier=parts["certifier"][0] if parts["certifier"] else None,
                          class_names=data.get("class_names"), input_shape=data.get("shape"),
                          batch_size=int(manifest.get("batch_size", 256)), detector_failure=policy,
                          output_sanity=sanity)
    log.debug("loaded bundle %s version %s (%d files verified)", root, verified.version, len(verified.files))
    return Bundle(path=root, manifest=manifest, pipeline=pipe, version=verified.version, drift=_drift(verified),
                  probes=_probes(verified))


def _drift(verified: VerifiedBundle) -> DriftReference | None:
    """The verified drift reference, or None for a bundle exported without one."""
    entry = verified.manifest.get("drift")
    if entry is None:
        return None
    if not isinstance(entry, dict) or entry.get("file") != DRIFT_FILE:
        raise BundleError(f"{verified.root / MANIFEST}: drift section must name the file {DRIFT_FILE}")
    return reference_from_tensors(_load_tensors(verified, DRIFT_FILE), entry, where=verified.root / DRIFT_FILE)


def _probes(verified: VerifiedBundle) -> ProbeSet | None:
    """The verified probe set, or None for a bundle exported without one."""
    from safetensors.torch import load

    entry = verified.manifest.get("probes")
    if entry is None:
        return None
    return probes_of_verified(verified.files, entry, where=verified.root / PROBES_FILE, load=load)
