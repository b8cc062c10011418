"""Rejected inputs kept for forensics and human review: ``<sha256>.bin`` plus ``<sha256>.json`` (request id, key,
reason, scores), under a total size cap (new files are skipped once it is reached) and a retention period."""
from __future__ import annotations

import json
import logging

import threading
import time
from pathlib import Path

from safedl.utils.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger("safedl.serve.quarantine")


class Quarantine:
    def __init__(self, folder: str | Path, *, max_bytes: int, retention_days: float):
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self.retention_s = float(retention_days) * 86400.0
        self._lock = threading.Lock()
        self._used: int | None = None

    def prune(self) -> int:
        """Delete files older than the retention period; returns how many were removed and recounts the size."""
        self.folder.mkdir(parents=True, exist_ok=True)
        cutoff, removed, used = time.time() - self.retention_s, 0, 0
        for p in self.folder.iterdir():
            try:
                st = p.stat()
                if st.st_mtime < cutoff:
                    p.unlink()
                    removed += 1
                else:
                    used += st.st_size
            except OSError:
                continue
        with self._lock:
            self._used = used
        return removed

    def keep(self, data: bytes, *, sha256: str, meta: dict) -> bool:
        """Store one rejected input; False when the cap is reached (logged) or it is already kept."""
        if self._used is None:
            self.prune()
        path = self.folder / f"{sha256}.bin"
        doc = json.dumps(meta, default=str)
        with self._lock:
            if path.exists():
                return False
            size = len(data) + len(doc)
            if self._used + size > self.max_bytes:
                log.warning("quarantine %s is full (%d bytes cap): input %s not kept", self.folder, self.max_bytes,
                            sha256, extra={"event": "quarantine_full"})
                return False
            self._used += size
        try:
            atomic_write_bytes(path, data)
            atomic_write_text(self.folder / f"{sha256}.json", doc)
        except OSError as exc:
            log.warning("quarantine write failed: %s", exc)
            return False
        return True


