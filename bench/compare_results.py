"""Compare two results.json files metric by metric, ignoring wall-clock fields: do two runs agree exactly?

Used to check that a refactor or an executor leaves every number unchanged (same machine, same seed):

    git worktree add /tmp/old REV
    PYTHONPATH=/tmp/old/src .venv/bin/safedl run examples/default.yaml --runs-dir /tmp/r_old
    .venv/bin/safedl run examples/default.yaml --runs-dir /tmp/r_new            # or --executor ray / process
    .venv/bin/python bench/compare_results.py /tmp/r_old/*/results.json /tmp/r_new/*/results.json

Prints every differing key (sections baseline, attacks, defenses, risk, gate) and exits 1 if any differ.
"""
from __future__ import annotations

import argparse
import json
import sys
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    args = parser.parse_args()
    with open(args.a) as fa, open(args.b) as fb:
        diffs = differences(json.load(fa), json.load(fb))
    for key, va, vb in diffs:
        print(f"{key}: {va!r} != {vb!r}")
    print(f"{len(diffs)} differing value(s) outside wall-clock fields")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
