"""One live view of a whole task graph: counts of done / running / waiting / failed tasks, the running ones with
their elapsed time, and the finished ones with theirs (rich ``Live``; silent when progress bars are disabled)."""
from __future__ import annotations

import time
from typing import Any

from safedl.executors.graph import Event

_STYLE = {"done": "green", "running": "cyan", "retrying": "yellow", "waiting": "dim", "failed": "red",
          "skipped": "red", "reused": "green"}


class GraphView:
    """Feed it every ``Event`` (``view.update``); use as a context manager around ``executor.run``.

    ``reused`` marks tasks that were not submitted because a finished result already existed. ``show_last`` caps
    the finished rows shown so a large grid stays readable.
    """

    def __init__(self, *, title: str = "stages", enabled: bool = True, show_last: int = 8):
        self.title, self.enabled, self.show_last = title, enabled, show_last
        self.states: dict[str, str] = {}
        self.attempt: dict[str, int] = {}
        self.started: dict[str, float] = {}
        self.took: dict[str, float] = {}
        self.finished: list[str] = []
        self._live: Any = None
        self._t0 = time.perf_counter()

    def mark_reused(self, task_id: str) -> None:
        self.states[task_id] = "reused"
        self.finished.append(task_id)

    def update(self, ev: Event) -> None:
        self.states[ev.task] = ev.state
        self.attempt[ev.task] = ev.attempt
        if ev.state == "running":
            self.started[ev.task] = time.perf_counter()
        elif ev.state in ("done", "failed", "skipped"):
            self.took[ev.task] = ev.time_s if ev.time_s is not None else 0.0
            self.finished.append(ev.task)
        if self._live is not None:
            self._live.update(self.render())

    def counts(self) -> dict[str, int]:
        out = {k: 0 for k in ("done", "reused", "running", "waiting", "failed")}
        for s in self.states.values():
            key = {"retrying": "running", "skipped": "failed"}.get(s, s)
            out[key] = out.get(key, 0) + 1
        return out

    def render(self) -> Any:
        from rich.table import Table

        c = self.counts()
        now = time.perf_counter()
        table = Table(title=f"{self.title}: {c['done'] + c['reused']}/{len(self.states)} done, {c['running']} running, "
                      f"{c['waiting']} waiting, {c['failed']} failed  ({now - self._t0:.0f} s)",
                      title_justify="left", show_edge=False, pad_edge=False)
        table.add_column("stage")
        table.add_column("state")
        table.add_column("time", justify="right")
        running = [t for t, s in self.states.items() if s in ("running", "retrying")]
        for t in running:
            note = f" (try {self.attempt[t]})" if self.attempt.get(t, 1) > 1 else ""
            table.add_row(t, f"[{_STYLE['running']}]running{note}", f"{now - self.started.get(t, now):.1f} s")
        for t in self.finished[-self.show_last:]:
            s = self.states[t]
            table.add_row(t, f"[{_STYLE[s]}]{s}", f"{self.took[t]:.1f} s" if t in self.took else "-")
        return table

    def __enter__(self) -> "GraphView":
        if self.enabled:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self.render(), console=Console(stderr=True), refresh_per_second=2, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.update(self.render())
            self._live.__exit__(*exc)
            self._live = None
