"""Adopting a run directory: refuse a non-empty folder that is not a safedl run, or a run made on other data;
then write the marker (``RunDir.marker``)."""
from __future__ import annotations

from pathlib import Path

import safedl
from safedl.data.dataset import Splits
from safedl.errors import UserError
from safedl.profile import Profile
from safedl.rundir import MARKER, MARKER_FORMAT, RunDir
from safedl.utils.io import atomic_write_json, json_hash


def data_fingerprint(splits: Splits) -> str:
    """One content hash of the train/val/test splits."""
    return json_hash(splits.hashes())


def is_run_dir(path: Path) -> bool:
    """A folder safedl made: it holds the run marker (or, from older versions, a stage record or results.json)."""
    return RunDir(path).is_run()


def adopt_run_dir(run_dir: Path, profile: Profile, splits: Splits) -> None:
    """Refuse a non-empty folder that is not a safedl run, or a run made on other data; then write the marker."""
    layout = RunDir(run_dir)
    run_dir = layout.path
    fingerprint = data_fingerprint(splits)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: exists and is not a folder; give a run directory")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not layout.is_run():
            raise UserError(f"{run_dir}: not a safedl run directory (no {MARKER}); refusing to write into it. "
                            "Give a folder that `safedl run` created, or leave out --resume to start a new run")
        old = (layout.read_marker() or {}).get("data_hash") if layout.marker.is_file() else None
        if old is not None and old != fingerprint:
            raise UserError(f"{run_dir}: the data changed since this run was made (content hash {old[:12]}, now "
                            f"{fingerprint[:12]}; data: {profile.dataset.path or profile.dataset.name}); refusing "
                            "to resume on other data. Start a new run (leave out --resume)")
    atomic_write_json(layout.marker, {
        "format": MARKER_FORMAT, "version": 1, "safedl": safedl.__version__, "data_hash": fingerprint,
        "data": {"name": splits.train.name, "format": profile.dataset.format, "path": profile.dataset.path,
                 "labels_path": profile.dataset.labels_path}})
