"""Detector thresholds measured on benign traffic (``safedl monitor calibrate``), kept in a JSON file that names
the bundle it was measured for.

Chen et al.'s procedure for the stateful detector (threshold = the ``fpr`` quantile, 0.1% by default, of benign
per-query mean k-NN distances) and Juuti et al.'s for PRADA (delta = the 1% quantile of benign Shapiro-Wilk W),
on streams the service would see: the bundle's training split (8-bit quantised, as decoded from PNG), one stream
in order and two of retry bursts (``safedl.defenses.query.streams``), PRADA grouping by the bundle's answers; and the
copycat / Sybil detectors' pixel subspace (PCA of the same streams) with its per-query threshold; and the confidence
below which adaptive misinformation answers score-tier keys (the ``max_flip`` quantile of the in-order stream).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from safedl.errors import UserError
from safedl.utils.io import atomic_write_text

KIND = "safedl-monitor-calibration"


def quantize(x: torch.Tensor) -> torch.Tensor:
    """What the service decodes from an 8-bit image."""
    return (x.clamp(0, 1) * 255).round() / 255


def benign_streams(x: torch.Tensor, *, seed: int, in_order: int = 3500, bursts: int = 2000) -> list[torch.Tensor]:
    """``defenses.query.streams.calibration_streams`` as the service decodes them (8-bit)."""
    from safedl.defenses.query.streams import calibration_streams

    return [quantize(s) for s in calibration_streams(x, seed=seed, in_order=in_order, bursts=bursts)]


def calibrate(bundle: Any, x_train: torch.Tensor, *, k: int = 50, history: int = 1000, min_queries: int = 100,
              window: int = 2000, stateful_fpr: float = 1e-3, prada_fpr: float = 0.01, seed: int = 0,
              in_order: int = 3500, bursts: int = 2000, components: int = 16, ood_quantile: float = 0.05,
              max_flip: float = 0.005) -> dict[str, Any]:
    """Thresholds for ``bundle`` (a loaded Bundle) from benign streams of ``x_train``; a JSON-ready record."""
    from safedl.defenses.query import PRADA, CopycatDetector, StatefulDetector

    t0 = time.perf_counter()
    streams = benign_streams(x_train, seed=seed, in_order=in_order, bursts=bursts)
    sd = StatefulDetector(k=k, history=history).calibrate(streams, fpr=stateful_fpr)
    pipe = bundle.pipeline
    num_classes = len(pipe.class_names or []) or int(bundle.manifest.get("data", {}).get("num_classes", 0))
    pr = PRADA(min_queries=min_queries, window=window, num_classes=max(1, num_classes),
               classify=lambda x: pipe.decide(x.to(pipe.device)).labels).calibrate(streams, fpr=prada_fpr)
    ood = CopycatDetector(components=components, quantile=ood_quantile).calibrate(streams).subspace_
    ood_record = {} if ood is None else ood.to_record()
    conf = torch.cat([pipe.decide(s[i:i + 500].to(pipe.device)).probs.max(1).values.cpu()
                      for s in streams[:1] for i in range(0, len(s), 500)])
    return {"kind": KIND, "bundle_version": bundle.version, "data": bundle.manifest.get("data", {}).get("name"),
            "created": time.time(), "seed": seed, "streams": [len(s) for s in streams],
            "stateful": {"k": k, "history": history, "fpr": stateful_fpr, "threshold": sd.threshold_},
            "prada": {"min_queries": min_queries, "window": window, "fpr": prada_fpr, "delta": pr.delta_},
            "copycat": {"quantile": ood_quantile, **ood_record},
            "misinformation": {"max_flip": max_flip, "tau": float(torch.quantile(conf.double(), max_flip))},
            "seconds": round(time.perf_counter() - t0, 1)}


def save_calibration(record: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    atomic_write_text(out, json.dumps(record, indent=1) + "\n")
    return out


def load_calibration(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"calibration {path}: no such file; make it with "
                        f"`safedl monitor calibrate BUNDLE --out {path}`")
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"calibration {path}: not JSON ({exc})") from None
    if not isinstance(rec, dict) or rec.get("kind") != KIND:
        raise UserError(f"calibration {path}: kind {rec.get('kind') if isinstance(rec, dict) else None!r}; "
                        f"expected {KIND!r} (a file from `safedl monitor calibrate`)")
    return rec
