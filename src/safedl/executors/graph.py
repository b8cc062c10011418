"""The task graph an executor schedules: picklable tasks, their dependencies, and what each produced.

Nothing here knows what a task computes. A task is ``fn(shared, inputs, **kwargs)``: ``shared`` is the one object
every task of a run reads (shipped once per worker), ``inputs`` maps each dependency's id to the value it returned.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

from safedl.errors import ConfigError

State = Literal["waiting", "running", "retrying", "done", "failed", "skipped"]


@dataclass(frozen=True)
class Task:
    """One node of the graph. ``fn`` must be a module-level function so process and Ray workers can import it."""

    id: str
    fn: Callable[..., Any]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    deps: tuple[str, ...] = ()


@dataclass
class Outcome:
    """What became of one task: its value, or the error of its last attempt (``skipped``: an input failed)."""

    id: str
    ok: bool
    value: Any = None
    error: str | None = None
    attempts: int = 0
    time_s: float = 0.0
    skipped: bool = False


@dataclass(frozen=True)
class Event:
    """A state change of one task, for progress views."""

    task: str
    state: State
    attempt: int = 0
    time_s: float | None = None
    error: str | None = None


def check_graph(tasks: Sequence[Task], given: Mapping[str, Any] = {}) -> list[str]:  # noqa: B006 (read only)
    """The task ids in a dependency order; ConfigError for a duplicate id, an unknown dependency or a cycle."""
    ids = [t.id for t in tasks]
    dup = sorted({i for i in ids if ids.count(i) > 1} | (set(ids) & set(given)))
    if dup:
        raise ConfigError(f"task graph: duplicate task id(s) {', '.join(dup)}")
    by_id = {t.id: t for t in tasks}
    for t in tasks:
        unknown = [d for d in t.deps if d not in by_id and d not in given]
        if unknown:
            raise ConfigError(f"task graph: task {t.id!r} depends on unknown task(s) {', '.join(unknown)}")
    order: list[str] = []
    mark: dict[str, int] = {}  # 1 = on the current path, 2 = placed

    for start in ids:
        stack = [(start, iter(by_id[start].deps))]
        if mark.get(start) == 2:
            continue
        mark[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next((d for d in it if d in by_id and mark.get(d) != 2), None)
            if nxt is None:
                stack.pop()
                mark[node] = 2
                order.append(node)
            elif mark.get(nxt) == 1:
                raise ConfigError(f"task graph: dependency cycle through {nxt!r}")
            else:
                mark[nxt] = 1
                stack.append((nxt, iter(by_id[nxt].deps)))
    return order
