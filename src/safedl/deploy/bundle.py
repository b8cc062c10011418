"""Deployment bundles: the defended system of one evaluated defense as a verified directory.

    BUNDLE/
      manifest.json     schema version, versions, run id, data shape and class names, the model's architecture,
                        every component (kind, registry name, constructor params, fitted scalars), the sha256 of
                        every other file, and the run's measured metrics for this system
      manifest.sha256   sha256 of manifest.json (and, with a signing key, an HMAC-SHA256 of it)
      model.safetensors the model's weights
      state/NN-name.safetensors  fitted tensors of component NN (e.g. a detector's statistics)

Tensors are stored as safetensors, so a bundle holds no pickled code; ``load_bundle`` verifies the schema, the
manifest digest (and signature when a key is given) and every file's sha256 before anything is built, and refuses
any mismatch with a :class:`~safedl.errors.BundleError` naming the file.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import safedl
from safedl import registry
from safedl.deploy.pipeline import SecurePipeline
from safedl.deploy.state import fitted_state, restore_state
from safedl.errors import BundleError, UserError
from safedl.utils.io import file_sha256

SCHEMA_VERSION = 1
KIND = "safedl-bundle"
MANIFEST, DIGEST, WEIGHTS = "manifest.json", "manifest.sha256", "model.safetensors"


@dataclass
class Bundle:
    """A loaded, verified bundle: its directory, manifest, the rebuilt pipeline and a short version id."""

    path: Path
    manifest: dict[str, Any]
    pipeline: SecurePipeline
    version: str


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    # clone: safetensors refuses tensors that share storage (e.g. tied weights)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))


def _load_tensors(path: Path, rel: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    head = path.read_bytes()[:2]
    if head[:1] == b"\x80" or head == b"PK":
        raise BundleError(f"{path}: holds a pickled payload (torch.save / pickle); bundles store tensors as "
                          f"safetensors only and this file ({rel}) is refused, never executed")
    try:
        return load_file(str(path))
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
                  signing_key: bytes | None = None, overwrite: bool = False) -> Path:
    """Write ``pipeline`` as a bundle directory at ``out`` (atomically: a temporary folder renamed at the end).

    ``model_spec``: how to rebuild the model's architecture (a zoo ``arch`` with its checkpoint metadata, or an
    ``entry_point``; optional ``trainer`` whose ``architecture`` transform the weights need); ``data``: name,
    shape (C, H, W), num_classes, class_names; ``metrics``: what the run measured for this system; ``run``: run id
    and what the system was evaluated against.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: exists; choose another --out or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _save_tensors(tmp / WEIGHTS, pipeline.model.state_dict())
        components = [_component_record(i, c, tmp) for i, c in enumerate(pipeline.components)]
        files = {p.relative_to(tmp).as_posix(): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "bundle_schema_version": SCHEMA_VERSION, "kind": KIND,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"safedl": safedl.__version__, "torch": torch.__version__},
            "run": run or {}, "data": data, "model": dict(model_spec, file=WEIGHTS),
            "components": components, "batch_size": pipeline.batch_size,
            "files": files, "metrics": metrics or {},
        }
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


def _digest_text(manifest_bytes: bytes, key: bytes | None) -> str:
    lines = [f"sha256 {hashlib.sha256(manifest_bytes).hexdigest()}"]
    if key is not None:
        lines.append(f"hmac-sha256 {hmac.new(key, manifest_bytes, hashlib.sha256).hexdigest()}")
    return "\n".join(lines) + "\n"


def _read_manifest(root: Path, signing_key: bytes | None) -> dict[str, Any]:
    mpath, dpath = root / MANIFEST, root / DIGEST
    for p in (mpath, dpath):
        if not p.is_file():
            raise BundleError(f"{p}: missing; {root} is not a complete safedl bundle")
    raw = mpath.read_bytes()
    lines = dict(line.split(" ", 1) for line in dpath.read_text(encoding="utf-8", errors="replace").split("\n")
                 if " " in line)
    if not hmac.compare_digest(lines.get("sha256", "").strip(), hashlib.sha256(raw).hexdigest()):
        raise BundleError(f"{mpath}: does not match its digest in {DIGEST} (the manifest was edited or truncated)")
    if signing_key is not None:
        expected = hmac.new(signing_key, raw, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(lines.get("hmac-sha256", "").strip(), expected):
            raise BundleError(f"{dpath}: the signature does not verify with the given key (unsigned, or signed "
                              "with another key)")
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise BundleError(f"{mpath}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise BundleError(f"{mpath}: not a safedl bundle manifest (kind {manifest.get('kind')!r}"
                          if isinstance(manifest, dict) else f"{mpath}: not a safedl bundle manifest")
    if manifest.get("bundle_schema_version") != SCHEMA_VERSION:
        raise BundleError(f"{mpath}: bundle schema version {manifest.get('bundle_schema_version')!r}; this safedl "
                          f"({safedl.__version__}) reads version {SCHEMA_VERSION}")
    return manifest


def _verify_files(root: Path, manifest: dict[str, Any]) -> None:
    files = manifest.get("files") or {}
    for rel, digest in files.items():
        p = (root / rel).resolve()
        if root.resolve() not in p.parents:
            raise BundleError(f"{root / MANIFEST}: file entry {rel!r} points outside the bundle")
        if not p.is_file():
            raise BundleError(f"{root / rel}: missing (listed in the manifest)")
        if not hmac.compare_digest(file_sha256(p), str(digest)):
            raise BundleError(f"{root / rel}: sha256 does not match the manifest (the file was changed or truncated)")
    extra = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and p.name not in (MANIFEST, DIGEST) and p.relative_to(root).as_posix() not in files)
    if extra:
        raise BundleError(f"{root / extra[0]}: not listed in the manifest (unexpected file in the bundle)")


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


def load_bundle(path: str | Path, *, device: str | torch.device = "cpu", signing_key: bytes | None = None,
                allow_entry_point: bool = True) -> Bundle:
    """Verify a bundle (schema, manifest digest/signature, every file's sha256) and rebuild its pipeline.

    A model given as a Python ``entry_point`` runs that function to build it (bundles hold no code, but the
    manifest names what to call and with which arguments): ``allow_entry_point=False`` refuses such a bundle
    before anything runs (for bundles from a less trusted source than the operator, e.g. an admin swap without a
    signing key).
    """
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory")
    manifest = _read_manifest(root, signing_key)
    _verify_files(root, manifest)
    if not allow_entry_point and isinstance(manifest.get("model"), dict) and manifest["model"].get("entry_point"):
        raise BundleError(f"{root / MANIFEST}: the model is built by the Python entry point "
                          f"{manifest['model']['entry_point']!r}, which is not run for an unsigned bundle here "
                          "(sign it and start the server with --signing-key-file)")
    dev = torch.device(device)
    try:
        model = build_model(manifest["model"])
        model.load_state_dict(_load_tensors(root / WEIGHTS, WEIGHTS))
        model = model.to(dev).eval()
        parts: dict[str, list[Any]] = {k: [] for k in ("preprocessor", "detector", "certifier", "postprocessor")}
        for rec in manifest["components"]:
            comp = registry.create(rec["kind"], rec["name"], **rec["params"])
            tensors = _load_tensors(root / rec["state"], rec["state"]) if rec.get("state") else {}
            restore_state(comp, tensors, rec.get("fitted", {}), dev)
            if rec["kind"] == "detector":
                comp.model_ = model
            parts[rec["kind"]].append(comp)
    except BundleError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, UserError) as exc:
        raise BundleError(f"{root / MANIFEST}: cannot rebuild the system ({type(exc).__name__}: {exc})") from None
    data = manifest.get("data", {})
    pipe = SecurePipeline(model=model, preprocessors=[p.to(dev) for p in parts["preprocessor"]],
                          detectors=parts["detector"], postprocessors=parts["postprocessor"],
                          certifier=parts["certifier"][0] if parts["certifier"] else None,
                          class_names=data.get("class_names"), input_shape=data.get("shape"),
                          batch_size=int(manifest.get("batch_size", 256)))
    version = hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest()[:12]
    return Bundle(path=root, manifest=manifest, pipeline=pipe, version=version)
