"""Run game-day scenarios one by one against a fresh :class:`LocalDeployment` each (so one scenario's alerts and
key actions never count for the next), polling every expectation until it fires or the scenario's watch window
ends. Everything is bounded: each action by its own count and the run's deadline, each watch by ``watch_s``."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from safedl.errors import UserError
from safedl.redteam.gameday.deployment import LocalDeployment, write_monitor_config
from safedl.redteam.gameday.scenarios import Scenario

log = logging.getLogger("safedl.redteam.gameday")
START_TIMEOUT_S = 300.0  # a 2-worker start on a loaded 2-core machine took over 120 s


@dataclass
class Context:
    """What scenarios share: test images (drift, kill), seed images of the extraction, seconds left."""

    x_test: torch.Tensor
    x_seed: torch.Tensor
    deadline: float
    killed: int | None = None

    @property
    def seconds(self) -> float:
        return max(self.deadline - time.monotonic(), 1.0)


@dataclass
class ScenarioResult:
    name: str
    summary: str
    action: dict[str, Any] = field(default_factory=dict)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    also_fired: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


def _watch(dep: LocalDeployment, sc: Scenario, started_wall: float, t0: float, baseline: Any,
           deadline: float) -> list[dict[str, Any]]:
    fired: dict[str, float] = {}
    end = min(t0 + sc.watch_s, deadline)
    while time.monotonic() < end and len(fired) < len(sc.expect):
        for e in sc.expect:
            if e.alert not in fired and e.check(dep, started_wall, baseline):
                fired[e.alert] = time.monotonic() - t0
        if len(fired) < len(sc.expect):
            time.sleep(0.5)
    return [{"alert": e.alert, "source": e.source, "target_s": e.target_s, "fired": e.alert in fired,
             "after_s": None if e.alert not in fired else round(fired[e.alert], 2),
             "met": e.alert in fired and fired[e.alert] <= e.target_s} for e in sc.expect]


def run_scenario(sc: Scenario, *, bundle: Path, workdir: Path, monitor: dict[str, Any], ctx: Context) -> ScenarioResult:
    """One scenario on its own deployment (its own databases and alert sink; ``monitor``: the arguments of
    :func:`write_monitor_config`); an action that raises is reported, never hidden."""
    res = ScenarioResult(sc.name, sc.summary)
    workdir.mkdir(parents=True, exist_ok=True)
    monitor_config = write_monitor_config(workdir, **monitor)
    dep = LocalDeployment(bundle, workdir, monitor_config=monitor_config, workers=sc.workers)
    try:
        dep.start(timeout_s=min(START_TIMEOUT_S, max(ctx.deadline - time.monotonic(), 1.0)))
    except UserError as exc:  # the deployment never served: the scenario's result, not the end of the game day
        dep.stop()
        res.error = f"the deployment did not start: {exc}"
        res.alerts = [{"alert": e.alert, "source": e.source, "target_s": e.target_s, "fired": False,
                       "after_s": None, "met": False} for e in sc.expect]
        return res
    with dep:
        baseline, started_wall, t0 = dep.scrape(), time.time(), time.monotonic()
        def act() -> None:
            try:
                res.action = sc.action(dep, ctx)
            except Exception as exc:  # noqa: BLE001 - reported in the game-day report
                res.error = f"{type(exc).__name__}: {exc}"
                log.warning("%s: the action failed: %s", sc.name, res.error)

        worker = threading.Thread(target=act, daemon=True)
        worker.start()
        res.alerts = _watch(dep, sc, started_wall, t0, baseline, ctx.deadline)
        worker.join(max(ctx.deadline - time.monotonic(), 1.0))
        expected = {a["alert"].split(":", 1)[1] for a in res.alerts if a["source"] == "monitor"}
        res.also_fired = sorted({a.get("rule") for a in dep.alerts() if a.get("state") == "firing"
                                 and float(a.get("started_at") or 0) >= started_wall} - expected)
        res.seconds = round(time.monotonic() - t0, 2)
    return res
