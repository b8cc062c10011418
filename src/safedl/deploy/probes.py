"""The labelled probe set a bundle carries: held-out clean test images, the run's stored adversarial examples and
its backdoor-triggered inputs, stored as ``probes/probes.safetensors`` (hashed in the manifest with every other
file, so ``safedl verify`` and bundle loading refuse a tampered one).

Tensors: ``x`` float32 N x C x H x W in [0, 1]; ``y`` int64 N, the true label; ``kind`` int64 N (0 clean,
1 adversarial, 2 triggered: index into :data:`KINDS`); ``target`` int64 N, the backdoor's target label of a
triggered input (-1 otherwise). ``GET /v1/admin/probes`` serves the same arrays as an ``.npz`` (``x``, ``y``,
``kind``, ``target``, ``kind_names``; no pickles): :func:`probes_npz`. The rollout controller and ``safedl
redteam`` read them through :func:`load_probes`.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safedl.errors import BundleError

FILE = "probes/probes.safetensors"
KINDS = ("clean", "adversarial", "triggered")


@dataclass(frozen=True)
class ProbeSet:
    """Labelled probe images (see the module docstring for the tensors)."""

    x: torch.Tensor
    y: torch.Tensor
    kind: torch.Tensor
    target: torch.Tensor

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        if self.x.dim() != 4 or any(t.shape != (n,) for t in (self.y, self.kind, self.target)):
            raise ValueError(f"probe set: x must be N x C x H x W and y, kind, target N long "
                             f"(got {tuple(self.x.shape)}, {tuple(self.y.shape)}, {tuple(self.kind.shape)}, "
                             f"{tuple(self.target.shape)})")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def mask(self, kind: str) -> torch.Tensor:
        """The rows of one kind (``clean``, ``adversarial`` or ``triggered``)."""
        return self.kind == KINDS.index(kind)

    def counts(self) -> dict[str, int]:
        return {k: int(self.mask(k).sum()) for k in KINDS}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"x": self.x.float(), "y": self.y.long(), "kind": self.kind.long(), "target": self.target.long()}

    def manifest_entry(self) -> dict[str, Any]:
        return {"file": FILE, "n": len(self), "counts": self.counts(), "kinds": list(KINDS)}


def probe_set(*, clean: tuple[torch.Tensor, torch.Tensor] | None = None,
              adversarial: list[tuple[torch.Tensor, torch.Tensor]] = (),
              triggered: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = (),
              n: int = 200, seed: int = 0) -> ProbeSet:
    """At most ``n`` rows of each source (a seeded sample without replacement): ``clean`` (x, y); ``adversarial``
    (x_adv, y) per attack; ``triggered`` (x, true y, target) per backdoor."""
    gen = torch.Generator().manual_seed(int(seed))
    parts: list[tuple[torch.Tensor, ...]] = []

    def take(kind: int, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> None:
        idx = torch.randperm(x.shape[0], generator=gen)[:n].sort().values
        parts.append((x[idx].float().cpu(), y[idx].long().cpu(), torch.full((len(idx),), kind, dtype=torch.long),
                      target[idx].long().cpu()))

    if clean is not None:
        take(0, clean[0], clean[1], torch.full_like(clean[1], -1))
    for x, y in adversarial:
        take(1, x, y, torch.full_like(y, -1))
    for x, y, target in triggered:
        take(2, x, y, target)
    if not parts:
        raise ValueError("probe set: no source given")
    return ProbeSet(*(torch.cat([p[i] for p in parts]) for i in range(4)))


def probes_from_tensors(tensors: dict[str, torch.Tensor], *, where: Path | str) -> ProbeSet:
    """The probe set of a verified probes file's tensors (BundleError naming the file when malformed)."""
    missing = sorted({"x", "y", "kind", "target"} - set(tensors))
    if missing:
        raise BundleError(f"{where}: the probe file lacks {', '.join(missing)}")
    try:
        ps = ProbeSet(x=tensors["x"].float(), y=tensors["y"].long(), kind=tensors["kind"].long(),
                      target=tensors["target"].long())
    except ValueError as exc:
        raise BundleError(f"{where}: {exc}") from None
    if len(ps) and (int(ps.kind.min()) < 0 or int(ps.kind.max()) >= len(KINDS)):
        raise BundleError(f"{where}: kind values must be 0-{len(KINDS) - 1} ({', '.join(KINDS)})")
    return ps


def load_probes(bundle_dir: str | Path, *, signing_key: bytes | None = None) -> ProbeSet:
    """The verified probe set of the bundle at ``bundle_dir`` (the whole bundle is verified first, as
    ``load_bundle`` does); BundleError when it is tampered with or has no probe set."""
    from safetensors.torch import load

    from safedl.deploy.verify import read_verified_bundle

    verified = read_verified_bundle(Path(bundle_dir), signing_key=signing_key)
    entry = verified.manifest.get("probes")
    if entry is None:
        raise BundleError(f"{bundle_dir}: the bundle has no probe set (export it again: `safedl export` stores one)")
    return probes_of_verified(verified.files, entry, where=Path(bundle_dir) / FILE, load=load)


def probes_of_verified(files: dict[str, bytes], entry: Any, *, where: Path, load: Any) -> ProbeSet:
    """The probe set from verified bundle bytes and the manifest's ``probes`` entry."""
    if not isinstance(entry, dict) or entry.get("file") != FILE:
        raise BundleError(f"{where.parent.parent / 'manifest.json'}: probes section must name the file {FILE}")
    data = files.get(FILE)
    if data is None:
        raise BundleError(f"{where}: not listed in the manifest's files, so it is not verified; refused")
    try:
        tensors = load(data)
    except Exception as exc:  # a malformed header
        raise BundleError(f"{where}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    return probes_from_tensors(tensors, where=where)


def probes_npz(ps: ProbeSet) -> bytes:
    """The probe set as ``.npz`` bytes: x (float32), y, kind, target (int64), kind_names (strings)."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, x=ps.x.numpy().astype("float32"), y=ps.y.numpy(), kind=ps.kind.numpy(),
             target=ps.target.numpy(), kind_names=np.array(KINDS))
    return buf.getvalue()
