"""An idle-machine wall-time estimate of a finished run from its per-stage CPU seconds (results.json ``cpu_s``).

On a shared machine a run's wall time counts the time other processes held the cores; its stages' CPU seconds do
not. This module replays the stage graph (baseline first in the driver, then every attack, then the shards of a
defense's strong adaptive suite and each defense after what it waits for) with a given number of one-thread
workers, each stage taking its CPU seconds, and greedy list scheduling in the order the run offers them
(``chains_first``, what ``safedl.executors`` does). Our own estimate, not a measurement: it assumes each worker has
a core to itself and leaves out the driver's data loading and report writing.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from safedl import rundir
from safedl.errors import ConfigError


@dataclass(frozen=True)
class StageCost:
    """One stage of the graph: its name, CPU seconds, the stage it waits for (None: only the baseline) and any
    further stages it waits for (a defense: the shards of its strong adaptive suite)."""

    name: str
    cpu_s: float
    after: str | None = None
    waits: tuple[str, ...] = ()

    @property
    def deps(self) -> tuple[str | None, ...]:
        return (self.after, *self.waits)


def stage_costs(results: Mapping[str, Any]) -> list[StageCost]:
    """The attack and defense stages of a results.json, in graph order (attacks, then defenses)."""
    out: list[StageCost] = []
    for e in results.get("attacks", []):
        out.append(StageCost(rundir.attack_stage_name(e["id"]), _cpu(e, f"attack {e['id']!r}")))
    suites, defenses = [], []
    for e in results.get("defenses", []):
        attack = rundir.attack_stage_name(e["against"])
        shards = [StageCost(rundir.suite_stage_name(e["id"], e["against"], int(sh["shard"]), int(sh["shards"])),
                            _cpu(sh, f"suite shard {sh['shard']} of defense {e['id']!r}"), attack)
                  for sh in e.get("suite_shards") or []]
        suites += shards
        defenses.append(StageCost(rundir.defense_stage_name(e["id"], e["against"]), _cpu(e, f"defense {e['id']!r}"),
                                  attack, tuple(s.name for s in shards)))
    return out + suites + defenses


def chains_first(stages: Sequence[StageCost]) -> list[StageCost]:
    """The stages in the order the executor is offered them (``safedl.run.graph.chains_first``): each attack
    something waits for, then its suite shards and defenses, then the attacks nothing waits for."""
    waited = {s.after for s in stages if s.after is not None}
    suites = {w for s in stages for w in s.waits}
    attacks = [s for s in stages if s.after is None]
    out = []
    for a in (s for s in attacks if s.name in waited):
        out += [a, *(s for s in stages if s.after == a.name and s.name in suites),
                *(s for s in stages if s.after == a.name and s.name not in suites)]
    return out + [s for s in attacks if s.name not in waited]


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
        ready = [s for s in waiting if all(d in done and done[d] <= now for d in s.deps)]
        if ready and free[0] <= now:
            s = ready[0]
            waiting.remove(s)
            heapq.heappop(free)
            end = now + s.cpu_s
            heapq.heappush(free, end)
            heapq.heappush(running, (end, s.name))
            continue
        if not running:
            unknown = sorted({str(d) for s in waiting for d in s.deps if d not in done})
            raise ConfigError(f"critical path: stages wait for unknown stage(s) {', '.join(unknown)}")
        end, name = heapq.heappop(running)
        done[name] = end
        now = max(now, end)
    return max([now, *(e for e, _ in running)])


def longest_chain(stages: Sequence[StageCost]) -> float:
    """The critical path with unlimited workers: the longest chain of stages (attack -> suite shard -> defense)."""
    by_name = {s.name: s for s in stages}
    finish: dict[str, float] = {}

    def end(s: StageCost) -> float:
        if s.name not in finish:
            finish[s.name] = s.cpu_s + max((end(by_name[d]) for d in s.deps if d in by_name), default=0.0)
        return finish[s.name]

    return max((end(s) for s in stages), default=0.0)


def estimate(results: Mapping[str, Any], *, workers: int = 2) -> dict[str, Any]:
    """Baseline CPU seconds over its torch threads (it trains alone in the driver), plus the stage makespan."""
    stages = stage_costs(results)
    base = results["baseline"]
    threads = max(1, int(results.get("environment", {}).get("threads") or 1))
    base_cpu = _cpu(base, "baseline")
    span = makespan(chains_first(stages), workers=workers)
    total = sum(s.cpu_s for s in stages)
    return {"workers": workers, "baseline_cpu_s": base_cpu, "baseline_threads": threads,
            "baseline_wall_estimate_s": base_cpu / threads, "stages_cpu_s": total,
            "stages_makespan_s": span, "stages_makespan_profile_order_s": makespan(stages, workers=workers),
            "longest_chain_s": longest_chain(stages),
            "estimate_s": base_cpu / threads + span,
            "by_stage": {s.name: s.cpu_s for s in sorted(stages, key=lambda s: -s.cpu_s)}}
