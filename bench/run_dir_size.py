"""How big a run directory is, and how much the lossless stage-state packing saves.

The default profile (``safedl init``) with only the costs that do not change file sizes cut down: 1 training epoch
instead of 10, square with 100 queries instead of 5,000, and the ensemble with cheap members. Every saved tensor
(evaluation images, adversarial examples, poisoned training sets, model weights) has the default run's shape, so the
sizes are the default run's sizes. Prints the run directory's size by top-level folder and, per attack stage, the
size of state.pt as written (packed) and as it would be unpacked (plain torch.save of the same state).

Rerun (seed 0, about 5-10 min on 2 busy CPU cores):
    PYTHONPATH=src nice -n 10 .venv/bin/python bench/run_dir_size.py
"""
from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from safedl.run import run_assessment
from safedl.run.state import load_stage_state
from safedl.profile import parse_profile
from safedl.templates import default_profile_text
from safedl.utils.progress import set_enabled


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def main() -> None:
    torch.set_num_threads(1)
    set_enabled(False)
    prof = yaml.safe_load(default_profile_text())
    prof["training"]["epochs"] = 1
    for a in prof["attacks"]["evasion"]:
        if a["name"] == "square":
            a["params"]["max_queries"] = 100
        if a["name"] == "ensemble":
            a["params"]["attacks"] = [{"name": "fgsm", "params": {}}, {"name": "pgd", "params": {"steps": 3}}]
    profile = parse_profile(prof, source="default (sizes only)")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, _ = run_assessment(profile, run_dir=Path(tmp) / "run", device="cpu")
        total = _size(run_dir)
        print(f"run directory: {total / 1e6:.1f} MB")
        for p in sorted(run_dir.iterdir()):
            print(f"  {p.name}: {_size(p) / 1e6:.2f} MB")
        packed = unpacked = 0
        for state in sorted((run_dir / "stages").glob("*/state.pt")):
            buf = io.BytesIO()
            torch.save(load_stage_state(state), buf)
            packed += state.stat().st_size
            unpacked += buf.tell()
            print(f"  {state.parent.name}/state.pt: {state.stat().st_size / 1e6:.2f} MB packed, "
                  f"{buf.tell() / 1e6:.2f} MB unpacked")
        print(f"stage states: {packed / 1e6:.1f} MB packed vs {unpacked / 1e6:.1f} MB unpacked; "
              f"run directory without packing: {(total - packed + unpacked) / 1e6:.1f} MB")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
