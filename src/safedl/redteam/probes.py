"""The probe set a red-team run uses: an ``.npz`` file (``--data``) or the bundle's probes (``GET /v1/admin/probes``).

File format (what ``safedl review export`` writes, plus optional replay arrays):

- ``x``: uint8 (0..255) or float (0..1) images, N x C x H x W (N x H x W for one channel); ``y``: int labels, N.
- ``x_adv`` / ``y_adv`` (optional): stored adversarial examples and their true labels (replayed as they are).
- ``x_trigger`` / ``y_trigger`` (optional): backdoor-triggered inputs and their true labels; ``trigger_target``
  (an int, or one per row): the class the backdoor sends them to.

``GET /v1/admin/probes`` answers the bundle's probe set in its own layout (deploy/probes.py: ``x``, ``y``,
``kind``, ``target``, ``kind_names``), which is split by kind into the arrays above.
"""
from __future__ import annotations

import http.client
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from safedl.errors import UserError
from safedl.serve.client import ServiceClient
from safedl.utils.io import atomic_write_bytes

log = logging.getLogger("safedl.redteam.probes")

PAIRS = (("x", "y"), ("x_adv", "y_adv"), ("x_trigger", "y_trigger"))


@dataclass(frozen=True)
class ProbeSet:
    """Clean probes ``x``/``y``; optional stored adversarial and triggered examples (None when absent)."""

    x: torch.Tensor
    y: torch.Tensor
    x_adv: torch.Tensor | None = None
    y_adv: torch.Tensor | None = None
    x_trigger: torch.Tensor | None = None
    y_trigger: torch.Tensor | None = None
    trigger_target: torch.Tensor | None = None

    def head(self, n: int) -> "ProbeSet":
        """The first ``n`` rows of every array."""
        cut = {k: (None if v is None else v[:n]) for k, v in vars(self).items()}
        return ProbeSet(**cut)


def _images(source: str, key: str, arr: np.ndarray) -> torch.Tensor:
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise UserError(f"{source}: {key!r} must be N x C x H x W (or N x H x W) images, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return torch.from_numpy(arr.astype(np.float32) / 255.0)
    if not np.issubdtype(arr.dtype, np.floating):
        raise UserError(f"{source}: {key!r} has dtype {arr.dtype}; allowed: uint8 (0..255) or float (0..1)")
    if not np.isfinite(arr).all() or arr.min(initial=0.0) < 0 or arr.max(initial=0.0) > 1:
        raise UserError(f"{source}: {key!r} float pixels must be finite and in [0, 1]")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def _labels(source: str, key: str, arr: np.ndarray, n: int) -> torch.Tensor:
    if arr.ndim != 1 or len(arr) != n or not np.issubdtype(arr.dtype, np.integer) or (n and arr.min() < 0):
        raise UserError(f"{source}: {key!r} must be {n} non-negative integer labels, got dtype {arr.dtype} "
                        f"shape {arr.shape}")
    return torch.from_numpy(arr.astype(np.int64))


def _split_bundle_layout(source: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A bundle's probe arrays (one ``kind`` per row: deploy/probes.py) as this file format's pairs."""
    names = [str(n) for n in arrays["kind_names"].tolist()]
    kind, wanted = arrays["kind"], {"clean": "x", "adversarial": "x_adv", "triggered": "x_trigger"}
    if set(names) - set(wanted) or kind.ndim != 1 or len(kind) != len(arrays["x"]) or "target" not in arrays:
        raise UserError(f"{source}: a bundle probe set needs kind (one per image, an index into kind_names "
                        f"{sorted(wanted)}) and target; got kind_names {names}")
    out: dict[str, np.ndarray] = {}
    for i, name in enumerate(names):
        rows = kind == i
        if name == "clean" or rows.any():
            xk = wanted[name]
            out[xk], out["y" + xk[1:]] = arrays["x"][rows], arrays["y"][rows]
            if name == "triggered":
                out["trigger_target"] = arrays["target"][rows]
    return out


def parse_probes(data: bytes, *, source: str) -> ProbeSet:
    """The probe set in ``data`` (.npz bytes: this module's format or a bundle's, split by kind); UserError naming
    ``source`` and the key on anything malformed."""
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
        arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"{source}: not a readable .npz file ({exc})") from None
    if "kind" in arrays and "kind_names" in arrays and "x" in arrays and "y" in arrays:
        arrays = _split_bundle_layout(source, arrays)
    out: dict[str, torch.Tensor | None] = {}
    for xk, yk in PAIRS:
        if (xk in arrays) != (yk in arrays):
            raise UserError(f"{source}: {xk!r} and {yk!r} go together; the file has only one of them")
        if xk not in arrays:
            if xk == "x":
                raise UserError(f"{source}: needs arrays 'x' (images) and 'y' (labels); it has {sorted(arrays)}")
            continue
        out[xk] = _images(source, xk, arrays[xk])
        out[yk] = _labels(source, yk, arrays[yk], len(out[xk]))
    if "x_trigger" in out:
        if "trigger_target" not in arrays:
            raise UserError(f"{source}: 'x_trigger' needs 'trigger_target' (the backdoor's target class)")
        t = np.broadcast_to(np.asarray(arrays["trigger_target"]), (len(out["x_trigger"]),))
        out["trigger_target"] = _labels(source, "trigger_target", np.ascontiguousarray(t), len(t))
    if len(out["x"]) == 0:
        raise UserError(f"{source}: 'x' holds no images")
    return ProbeSet(**out)


def load_probe_file(path: Path) -> ProbeSet:
    """``--data FILE``: the probe set in an .npz file."""
    if not path.is_file():
        raise UserError(f"--data {path}: not found")
    return parse_probes(path.read_bytes(), source=f"--data {path}")


def save_probe_file(path: Path, probes: ProbeSet) -> None:
    """Write ``probes`` in the format :func:`load_probe_file` reads (float32 images)."""
    arrays = {k: v.numpy() for k, v in vars(probes).items() if v is not None}
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def fetch_probes(client: ServiceClient, *, path: str = "/v1/admin/probes") -> ProbeSet:
    """The bundle's probe set from the service (an admin key's ``GET /v1/admin/probes``, an .npz body)."""
    cls = http.client.HTTPSConnection if client.scheme == "https" else http.client.HTTPConnection
    conn = cls(client.host, client.port, timeout=client.timeout_s)
    try:
        conn.request("GET", client.base_path + path, headers={"Authorization": f"Bearer {client.token}"})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise UserError(f"GET {path}: HTTP {resp.status} ({body[:200].decode(errors='replace')}); give the probe "
                        "set with --data FILE, or a key with scope admin on a service that serves probes")
    return parse_probes(body, source=f"GET {path}")
