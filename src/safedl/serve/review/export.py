"""``safedl review export``: the labelled inputs of a review queue as one ``.npz`` plus its manifest.

The file holds ``x`` (float32 N x C x H x W, the pixels the model saw) and ``y`` (int64) for the inputs a reviewer
gave a class name: a data set ``safedl run`` reads (``dataset.extra: [{format: npz, path: ...}]``, a trusted clean
set ``trusted_clean_set: {source: path, path: ...}``, or a field test set). Inputs labelled ``attack`` are in
``x_attack`` (with ``attack_predicted``, the class the model gave them) and ``benign`` ones in ``x_benign``: kept for
detector work, never mixed into ``x``. ``manifest`` (a JSON string, also written next to the file as
``<out>.manifest.json`` together with the file's sha256) says for every row which request and image it came
from, its label, who labelled it and when, and the content hash of the arrays."""
from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

import safedl
from safedl.errors import UserError
from safedl.serve.review.store import ReviewItem, ReviewStore
from safedl.utils.io import atomic_write_bytes, atomic_write_text

MANIFEST_SCHEMA = 1


def content_hash(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the arrays' names, dtypes, shapes and bytes, in name order (independent of zip metadata)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{list(a.shape)}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _stack(items: list[ReviewItem], shape: tuple[int, ...]) -> np.ndarray:
    return (np.stack([i.image for i in items]).astype(np.float32) if items
            else np.zeros((0, *shape), dtype=np.float32))


def _entry(item: ReviewItem, *, part: str, y: int | None) -> dict[str, Any]:
    return {"part": part, "id": item.id, "request_id": item.request_id, "image_index": item.image_index,
            "input_sha256": item.input_sha256, "label": item.review_label, "y": y, "labelled_by": item.labelled_by,
            "labelled_at": item.labelled_at, "key_id": item.key_id, "bundle_version": item.bundle_version,
            "reason": item.reason, "queued_at": item.ts}


def build_export(items: list[ReviewItem]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, manifest) of labelled items; UserError when there are none or they disagree on shape or classes."""
    if not items:
        raise UserError("the review queue holds no labelled input; label some first (`safedl review label ID "
                        "LABEL --db ...`)")
    shapes = {tuple(i.image.shape) for i in items}
    names = {tuple(i.class_names) for i in items}
    if len(shapes) > 1 or len(names) > 1:
        raise UserError(f"the labelled inputs come from bundles with different input shapes {sorted(shapes)} or "
                        f"class names; export them from separate queues")
    shape, classes = shapes.pop(), list(names.pop())
    parts: dict[str, list[ReviewItem]] = {"x": [], "x_attack": [], "x_benign": []}
    for i in items:
        parts["x_attack" if i.review_label == "attack" else "x_benign" if i.review_label == "benign" else "x"].append(i)
    arrays = {k: _stack(v, shape) for k, v in parts.items()}
    arrays["y"] = np.array([classes.index(i.review_label) for i in parts["x"]], dtype=np.int64)
    arrays["attack_predicted"] = np.array([-1 if i.label is None else i.label for i in parts["x_attack"]],
                                          dtype=np.int64)
    rows = [_entry(i, part="x", y=classes.index(i.review_label)) for i in parts["x"]]
    rows += [_entry(i, part=p, y=None) for p in ("x_attack", "x_benign") for i in parts[p]]
    manifest = {"schema_version": MANIFEST_SCHEMA, "kind": "safedl-review-export", "safedl": safedl.__version__,
                "created_at": time.time(), "class_names": classes, "shape": list(shape),
                "counts": {"classes": len(parts["x"]), "attack": len(parts["x_attack"]),
                           "benign": len(parts["x_benign"])},
                "content_sha256": content_hash(arrays), "items": rows}
    return arrays, manifest


def export_reviewed(store: ReviewStore, out: str | Path) -> dict[str, Any]:
    """Write ``out`` (.npz) and ``out.manifest.json`` from the store's labelled inputs; returns the manifest (with
    ``file_sha256``). Nothing is written when there is nothing to export."""
    out = Path(out)
    if out.suffix != ".npz":
        raise UserError(f"--out {out}: give a file name ending in .npz")
    arrays, manifest = build_export(store.labelled())
    manifest["source"] = store.target.display
    buf = io.BytesIO()
    np.savez_compressed(buf, manifest=np.array(json.dumps(manifest)), **arrays)
    data = buf.getvalue()
    atomic_write_bytes(out, data)
    sidecar = dict(manifest, file=out.name, file_sha256=hashlib.sha256(data).hexdigest())
    atomic_write_text(manifest_path(out), json.dumps(sidecar, indent=2))
    return sidecar


def manifest_path(out: str | Path) -> Path:
    """Where the manifest of export ``out`` is written."""
    out = Path(out)
    return out.with_name(out.name + ".manifest.json")
