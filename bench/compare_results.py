"""Compare two results.json files metric by metric, ignoring wall-clock fields: do two runs agree exactly?

Used to check that a refactor or an executor leaves every number unchanged (same machine, same seed):

    git worktree add /tmp/old REV
    PYTHONPATH=/tmp/old/src .venv/bin/safedl run examples/default.yaml --runs-dir /tmp/r_old
    .venv/bin/safedl run examples/default.yaml --runs-dir /tmp/r_new            # or --executor ray / process
    .venv/bin/python bench/compare_results.py /tmp/r_old/*/results.json /tmp/r_new/*/results.json

Prints every differing key (sections baseline, attacks, defenses, risk, gate) and exits 1 if any differ. Across many
commits, `--shared-only` compares only the values both sides have and lists the fields one side lacks as patterns
(list indices collapsed): a field added or renamed on purpose is then reported, not counted as a changed number. A run
directory may stand for its results.json; one still running (no results.json yet) is compared on the stages both
sides have finished (stages/*/stage.json entries, attacks and defenses matched by stage name), and the stages only one
side has are listed.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

SECTIONS = ("baseline", "attacks", "defenses", "risk", "gate")
WALL_CLOCK = ("time_s", "cpu_s", "time_per_sample_s", "latency_added_ms_per_image", "training_time_s", "created")


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def differences(a: dict, b: dict) -> list[tuple[str, Any, Any]]:
    out = []
    for section in SECTIONS:
        fa, fb = flatten(a.get(section), section), flatten(b.get(section), section)
        for key in sorted(set(fa) | set(fb)):
            if any(w in key for w in WALL_CLOCK) or "history" in key:
                continue
            if fa.get(key) != fb.get(key):
                out.append((key, fa.get(key), fb.get(key)))
    return out


def field_changes(a: dict, b: dict) -> tuple[int, list[tuple[str, Any, Any]], Counter]:
    """(values both sides have, those of them that differ, pattern -> count of fields only one side has)."""
    shared, diffs, only = 0, [], Counter()
    for section in SECTIONS:
        fa, fb = flatten(a.get(section), section), flatten(b.get(section), section)
        for key in sorted(set(fa) | set(fb)):
            if any(w in key for w in WALL_CLOCK) or "history" in key:
                continue
            if key in fa and key in fb:
                shared += 1
                if fa[key] != fb[key]:
                    diffs.append((key, fa[key], fb[key]))
            else:
                only[("only in A: " if key in fa else "only in B: ") + re.sub(r"\[\d+\]", "[]", key)] += 1
    return shared, diffs, only


def finished_stages(run_dir: Path) -> dict[str, dict]:
    """Stage name -> results entry of every stage a run directory has finished."""
    stages = sorted(Path(run_dir).glob("stages/*/stage.json"))
    if not stages and not (Path(run_dir) / "stages").is_dir():
        raise FileNotFoundError(f"{run_dir}: no results.json and no stages/ folder (not a run directory)")
    return {s.parent.name: json.loads(s.read_text())["entry"] for s in stages}


def load_pair(a: str, b: str) -> tuple[dict, dict, list[str]]:
    """Both results (files or run directories); for an unfinished run, the stages both have finished, as results
    sections, and a note per stage only one side has."""
    paths = [Path(a), Path(b)]
    done = [p if p.is_file() else p / "results.json" for p in paths]
    if all(d.is_file() for d in done):
        return json.loads(done[0].read_text()), json.loads(done[1].read_text()), []
    sa, sb = (finished_stages(p.parent if p.is_file() else p) for p in paths)
    notes = [f"unfinished: stage {n} only in {'A' if n in sa else 'B'}" for n in sorted(set(sa) ^ set(sb))]
    shared = sorted(set(sa) & set(sb))

    def as_results(stages: dict[str, dict]) -> dict:
        out: dict[str, Any] = {"attacks": [stages[n] for n in shared if n.startswith("attack-")],
                               "defenses": [stages[n] for n in shared if n.startswith("defense-")]}
        if "baseline" in shared:
            out["baseline"] = stages["baseline"]
        return out

    return as_results(sa), as_results(sb), [f"compared the {len(shared)} finished stages: {', '.join(shared)}"] + notes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--shared-only", action="store_true",
                        help="compare the values both sides have; list fields one side lacks as patterns")
    args = parser.parse_args()
    ra, rb, notes = load_pair(args.a, args.b)
    for note in notes:
        print(note)
    if args.shared_only:
        shared, diffs, only = field_changes(ra, rb)
        for pattern, count in sorted(only.items()):
            print(f"{pattern} ({count})")
        for key, va, vb in diffs:
            print(f"{key}: {va!r} != {vb!r}")
        print(f"{len(diffs)} of {shared} shared value(s) differ outside wall-clock fields")
        return 1 if diffs else 0
    diffs = differences(ra, rb)
    for key, va, vb in diffs:
        print(f"{key}: {va!r} != {vb!r}")
    print(f"{len(diffs)} differing value(s) outside wall-clock fields")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
