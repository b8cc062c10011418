"""An idle-machine wall-time estimate of a finished run from its per-stage CPU seconds (results.json ``cpu_s``).

On a shared machine a run's wall time counts the time other processes held the cores; its stages' CPU seconds do
not. This module replays the stage graph (baseline first in the driver, then every attack, then each defense after
the attack it is evaluated against) with a given number of one-thread workers, each stage taking its CPU seconds,
and greedy list scheduling in graph order (what ``safedl.executors`` does). Our own estimate, not a measurement:
it assumes each worker has a core to itself and leaves out the driver's data loading and report writing.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from safedl import rundir
from safedl.errors import ConfigError


@dataclass(frozen=True)
class StageCost:
    """One stage of the graph: its name, CPU seconds and the stage it waits for (None: only the baseline)."""

    name: str
    cpu_s: float
    after: str | None = None


def stage_costs(results: Mapping[str, Any]) -> list[StageCost]:
    """The attack and defense stages of a results.json, in graph order (attacks, then defenses)."""
    out: list[StageCost] = []
    for e in results.get("attacks", []):
        out.append(StageCost(rundir.attack_stage_name(e["id"]), _cpu(e, f"attack {e['id']!r}")))
    for e in results.get("defenses", []):
        out.append(StageCost(rundir.defense_stage_name(e["id"], e["against"]), _cpu(e, f"defense {e['id']!r}"),
                             rundir.attack_stage_name(e["against"])))
    return out


def _cpu(entry: Mapping[str, Any], what: str) -> float:
    if entry.get("cpu_s") is None:
        raise ConfigError(f"results.json: {what} has no 'cpu_s' (runs before per-stage CPU time was recorded); "
                          "rerun the stage")
    return float(entry["cpu_s"])


def makespan(stages: Sequence[StageCost], *, workers: int) -> float:
    """Finish time of the last stage with ``workers`` one-thread workers, greedy list scheduling in the given order:
    whenever a worker is free it takes the first waiting stage whose input is done."""
    if workers < 1:
        raise ConfigError(f"critical path: workers = {workers}; allowed: an integer >= 1")
    done: dict[str | None, float] = {None: 0.0}
    waiting = list(stages)
    free = [0.0] * workers  # the time each worker becomes free (a heap)
    running: list[tuple[float, str]] = []
    now = 0.0
    while waiting:
        ready = [s for s in waiting if s.after in done and done[s.after] <= now]
        if ready and free[0] <= now:
            s = ready[0]
            waiting.remove(s)
            heapq.heappop(free)
            end = now + s.cpu_s
            heapq.heappush(free, end)
            heapq.heappush(running, (end, s.name))
            continue
        if not running:
            unknown = sorted({str(s.after) for s in waiting})
            raise ConfigError(f"critical path: stages wait for unknown stage(s) {', '.join(unknown)}")
        end, name = heapq.heappop(running)
        done[name] = end
        now = max(now, end)
    return max([now, *(e for e, _ in running)])


def longest_chain(stages: Sequence[StageCost]) -> float:
    """The critical path with unlimited workers: the longest attack + defense chain."""
    by_name = {s.name: s.cpu_s for s in stages}
    return max((s.cpu_s + by_name.get(s.after or "", 0.0) for s in stages), default=0.0)


def estimate(results: Mapping[str, Any], *, workers: int = 2) -> dict[str, Any]:
    """Baseline CPU seconds over its torch threads (it trains alone in the driver), plus the stage makespan."""
    stages = stage_costs(results)
    base = results["baseline"]
    threads = max(1, int(results.get("environment", {}).get("threads") or 1))
    base_cpu = _cpu(base, "baseline")
    span = makespan(stages, workers=workers)
    total = sum(s.cpu_s for s in stages)
    return {"workers": workers, "baseline_cpu_s": base_cpu, "baseline_threads": threads,
            "baseline_wall_estimate_s": base_cpu / threads, "stages_cpu_s": total,
            "stages_makespan_s": span, "longest_chain_s": longest_chain(stages),
            "estimate_s": base_cpu / threads + span,
            "by_stage": {s.name: s.cpu_s for s in sorted(stages, key=lambda s: -s.cpu_s)}}
