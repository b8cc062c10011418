"""The stage cache: each finished stage is saved atomically in ``RUN_DIR/stages/<stage>/`` with its content key
(a hash of the profile sections and inputs it depends on) and the sha256 of every file it holds; a resumed run
reuses a stage exactly when its key matches and its files are intact."""
from __future__ import annotations

import json
import logging

from safedl.run.state import LazyState, pack_state
from safedl.rundir import RunDir
from safedl.utils.io import atomic_torch_save, atomic_write_bytes, atomic_write_json, file_sha256

log = logging.getLogger(__name__)


class StageCache:
    """Finished stages of one run directory."""

    def __init__(self, layout: RunDir):
        self.layout = layout

    def cached(self, name: str, key: str) -> dict | None:
        """The finished stage's record when its key matches and every file it recorded is intact, else None (redo)."""
        marker = self.layout.stage_record(name)
        if not marker.is_file():
            return None
        try:
            blob = json.loads(marker.read_text())
        except (ValueError, OSError):
            return None
        if not isinstance(blob, dict) or blob.get("key") != key:
            return None
        for rel, digest in (blob.get("files") or {}).items():
            f = self.layout.stage(name) / rel
            if not f.is_file() or file_sha256(f) != digest:
                log.warning("stage %s: %s is missing or does not match the sha256 recorded in stage.json; "
                            "redoing the stage", name, f)
                return None
        return blob

    def finish(self, name: str, key: str, entry: dict, state: dict | None = None) -> None:
        """Save the stage's state (packed, lossless), then stage.json with the sha256 of every file in the stage."""
        d = self.layout.stage(name)
        record = self.layout.stage_record(name)
        if state is not None:
            atomic_torch_save(self.layout.stage_state(name), pack_state(state))
        files = {f.relative_to(d).as_posix(): file_sha256(f) for f in sorted(d.rglob("*"))
                 if f.is_file() and f.name != record.name and not f.name.startswith(".")}
        atomic_write_json(record, {"key": key, "entry": entry, "files": files})  # last: marks the stage done

    def state(self, name: str) -> LazyState:
        """A finished stage's saved state, read from disk on first use."""
        return LazyState(self.layout.stage_state(name))

    def write_file(self, rel: str, data: bytes) -> None:
        """Write a file a stage made in its private folder to the same place in the run directory."""
        root = self.layout.path.resolve()
        path = (self.layout.path / rel).resolve()
        if not path.is_relative_to(root):
            raise ValueError(f"a stage returned a file outside the run directory: {rel!r}")
        atomic_write_bytes(path, data)

