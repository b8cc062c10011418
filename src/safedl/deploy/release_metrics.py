"""What the release measured, read from the served bundle's manifest (``GET /v1/model``): per attack, its robust
accuracy and the eps it was measured at (``metrics[attack_id]``: ``{"metrics": ..., "attack_params": ...}``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ReleaseMeasurement:
    attack_id: str
    robust_accuracy: float
    eps: float | None


def release_measurements(manifest: dict[str, Any], attack: str) -> list[ReleaseMeasurement]:
    """The manifest's entries for ``attack`` (id ``attack`` or ``attack`` plus a suffix such as ``square_8``)."""
    metrics = manifest.get("metrics") if isinstance(manifest.get("metrics"), dict) else {}
    out = []
    for aid, entry in sorted(metrics.items()):
        if aid != attack and not aid.startswith(attack + "_") or not isinstance(entry, dict):
            continue
        ra = (entry.get("metrics") or {}).get("robust_accuracy")
        value = ra.get("value") if isinstance(ra, dict) else None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        params = entry.get("attack_params") if isinstance(entry.get("attack_params"), dict) else {}
        eps = params.get("eps")
        out.append(ReleaseMeasurement(aid, float(value), float(eps) if isinstance(eps, (int, float)) else None))
    return out


def matching_release(manifest: dict[str, Any], attack: str, eps: float) -> float | None:
    """The release's robust accuracy for ``attack`` at this ``eps`` (None when it measured none there)."""
    for m in release_measurements(manifest, attack):
        if m.eps is not None and abs(m.eps - eps) <= 1e-9 * max(1.0, abs(eps)):
            return m.robust_accuracy
    return None


def release_eps(manifest: dict[str, Any], attack: str) -> float | None:
    """The eps the release measured ``attack`` at (its first entry with one), to default ``--eps`` to."""
    return next((m.eps for m in release_measurements(manifest, attack) if m.eps is not None), None)
