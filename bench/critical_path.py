"""Idle-machine wall-time estimate of a finished run from its per-stage CPU seconds (results.json ``cpu_s``).

    safedl cache clear   # or SAFEDL_CACHE_DIR=<empty folder>
    nice -n 10 .venv/bin/safedl run examples/default.yaml --runs-dir /tmp/cold
    .venv/bin/python bench/critical_path.py /tmp/cold/*/results.json --workers 2

Prints the baseline's CPU seconds over its torch threads, the makespan of the stage graph replayed with --workers
one-thread workers (safedl.run.critical_path: greedy, in the order the run offers the stages), the longest chain
and the CPU seconds of every stage, largest first. Driver work (data loading, report) is not in it.

What-if replays (our model, not a measurement; the printout says which was used):

- ``--regroup K``: a run whose strong suite ran in shards, its shards' per-batch CPU seconds (``batch_cpu_s``)
  dealt round-robin into K shards, as ``execution.suite_shards: K`` would;
- ``--model-split K --suite-share S``: a run whose suite ran unsplit (older runs), the defense ``--defense``'s CPU
  seconds taken as S x suite + (1 - S) x the rest, the suite cut into K equal shards.
- ``--use-time``: ``time_s`` (wall) in place of ``cpu_s``, for runs recorded before ``cpu_s`` existed.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path
from typing import Any

from safedl.run.critical_path import estimate

log = logging.getLogger("critical_path")


def _use_time(r: dict[str, Any]) -> dict[str, Any]:
    r = copy.deepcopy(r)
    for e in [r["baseline"], *r["attacks"], *r["defenses"]]:
        e["cpu_s"] = e["time_s"]
    r.setdefault("environment", {})["threads"] = 1  # time_s is wall already
    return r


def _regroup(r: dict[str, Any], k: int) -> dict[str, Any]:
    r = copy.deepcopy(r)
    for d in r["defenses"]:
        if not d.get("suite_shards"):
            continue
        by_start = {b: c for sh in d["suite_shards"] for b, c in zip(sh["batches"], sh["batch_cpu_s"])}
        starts = sorted(by_start)
        k_eff = max(1, min(k, len(starts)))
        d["suite_shards"] = [{"shard": i, "shards": k_eff, "batches": starts[i::k_eff],
                              "cpu_s": sum(by_start[s] for s in starts[i::k_eff])} for i in range(k_eff)]
    return r


def _model_split(r: dict[str, Any], defense: str, k: int, share: float) -> dict[str, Any]:
    r = copy.deepcopy(r)
    for d in r["defenses"]:
        if d["id"] == defense and not d.get("suite_shards"):
            suite = d["cpu_s"] * share
            d["cpu_s"] -= suite
            d["suite_shards"] = [{"shard": i, "shards": k, "cpu_s": suite / k} for i in range(k)]
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", type=Path)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--use-time", action="store_true")
    ap.add_argument("--regroup", type=int, default=None)
    ap.add_argument("--model-split", type=int, default=None)
    ap.add_argument("--suite-share", type=float, default=0.9)
    ap.add_argument("--defense", default="feature_squeezing")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    r = json.loads(args.results.read_text())
    how = ["time_s" if args.use_time else "cpu_s"]
    if args.use_time:
        r = _use_time(r)
    if args.regroup:
        r, how = _regroup(r, args.regroup), how + [f"suite batches regrouped into {args.regroup} shards"]
    if args.model_split:
        r = _model_split(r, args.defense, args.model_split, args.suite_share)
        how.append(f"MODEL: {args.defense} = {args.suite_share:g} suite in {args.model_split} equal shards + rest")
    est = estimate(r, workers=args.workers)
    log.info("%s", json.dumps({"replayed_from": "; ".join(how), **est}, indent=2))


if __name__ == "__main__":
    main()
