"""Atomic file writes and content hashes: a crash never leaves a half-written result."""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write to a temporary file in the target's folder, flush it to disk, then rename it over the target: readers
    see the old file or the new one, never a half-written one, and a failed write leaves the old file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as fh:  # the rename must not reach the disk before the data does
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; results are meant to be shared like any other file the user writes.
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    _atomic(Path(path), lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _atomic(Path(path), lambda p: p.write_bytes(data))


def _finite(obj: Any) -> Any:
    """NaN and infinities become null: strict JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, torch.Tensor) or type(obj).__module__ == "numpy":
        return _finite(obj.tolist())
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write strict JSON (NaN/inf as null) atomically."""
    text = json.dumps(_finite(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    atomic_write_text(path, text + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    _atomic(Path(path), lambda p: torch.save(obj, p))


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def tensor_hash(*tensors: torch.Tensor) -> str:
    """SHA-256 over tensors' dtype, shape and bytes (CPU, contiguous)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        # Raw bytes through a uint8 view: works for dtypes numpy lacks (bfloat16) and gives the same bytes as
        # .numpy().tobytes() for the others.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def json_hash(obj: Any) -> str:
    """SHA-256 of a canonical JSON encoding (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
