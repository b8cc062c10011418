"""Idle-machine wall-time estimate of a finished run from its per-stage CPU seconds (results.json ``cpu_s``).

    safedl cache clear   # or SAFEDL_CACHE_DIR=<empty folder>
    nice -n 10 .venv/bin/safedl run examples/default.yaml --runs-dir /tmp/cold
    .venv/bin/python bench/critical_path.py /tmp/cold/*/results.json --workers 2

Prints the baseline's CPU seconds over its torch threads, the makespan of the stage graph replayed with --workers
one-thread workers (safedl.run.critical_path: greedy, graph order), the longest attack + defense chain and the CPU
seconds of every stage, largest first. Driver work (data loading, report) is not in it.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from safedl.run.critical_path import estimate

log = logging.getLogger("critical_path")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", type=Path)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    est = estimate(json.loads(args.results.read_text()), workers=args.workers)
    log.info("%s", json.dumps(est, indent=2))


if __name__ == "__main__":
    main()
