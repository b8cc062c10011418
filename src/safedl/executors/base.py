"""The scheduling loop every executor shares: submit a task as soon as its inputs are done, retry a failed task
once, skip the tasks whose inputs failed, and hand every finished task to the caller the moment it finishes.

A backend only starts workers, submits one task, waits for finished ones and stops; see ``serial``, ``process``
and ``ray``.
"""
from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Mapping, Sequence

from safedl.errors import ConfigError
from safedl.executors.graph import Event, Outcome, Task, check_graph

log = logging.getLogger(__name__)
OnResult = Callable[[Outcome], None]
OnEvent = Callable[[Event], None]


def _nothing(_: Any) -> None:
    return None


class Executor(ABC):
    """Runs a task graph. ``workers``: tasks at a time (None: the backend's default); ``threads_per_task``: torch
    threads each task runs with (None: leave the process default); ``max_attempts``: tries per task (2 = retry once).
    """

    name: ClassVar[str]
    #: tasks run in the caller's own process (values are passed by reference, nothing is pickled)
    in_process: ClassVar[bool] = False

    def __init__(self, *, workers: int | None = None, threads_per_task: int | None = None, max_attempts: int = 2):
        for key, val in (("workers", workers), ("threads_per_task", threads_per_task), ("max_attempts", max_attempts)):
            if val is not None and (not isinstance(val, int) or val < 1):
                raise ConfigError(f"{self.name} executor: {key} must be a positive integer, got {val!r}")
        self.workers, self.threads_per_task, self.max_attempts = workers, threads_per_task, max_attempts

    def resolved(self) -> tuple[int | None, int | None]:
        """(tasks at a time, torch threads per task) this executor runs with, its defaults filled in where the
        backend fixes them (None: decided elsewhere, e.g. by a cluster)."""
        return self.workers, self.threads_per_task

    # -- backend interface ----------------------------------------------------------------------------------
    @abstractmethod
    def _start(self, shared: Any, given: Mapping[str, Any]) -> None:
        """Start workers and ship ``shared`` (and the given values) to them once."""

    @abstractmethod
    def _capacity(self) -> int:
        """How many more tasks may be submitted now."""

    @abstractmethod
    def _submit(self, task: Task, deps: Mapping[str, Any]) -> None:
        """Start ``task``; ``deps`` maps each dependency id to its handle (see ``_handle``)."""

    @abstractmethod
    def _wait(self) -> list[tuple[str, bool, Any, str | None, float]]:
        """Block until at least one task finished; (id, ok, value or None, error or None, seconds) for each."""

    @abstractmethod
    def _stop(self, *, kill: bool) -> None:
        """Stop the workers (``kill``: at once, abandoning running tasks)."""

    def _handle(self, task_id: str, value: Any, *, needed: bool) -> Any:
        """What dependants receive for a finished task (the value itself; Ray: an object reference)."""
        return value

    def _handle_given(self, task_id: str, value: Any) -> Any:
        return value

    # -- the loop -------------------------------------------------------------------------------------------
    def run(self, tasks: Sequence[Task], *, shared: Any = None, given: Mapping[str, Any] | None = None,
            on_result: OnResult = _nothing, on_event: OnEvent = _nothing) -> dict[str, Outcome]:
        """Run every task; ``given`` holds values of finished tasks that tasks may depend on (not run again).

        ``on_result`` is called in this process as soon as each task finishes (ok, failed or skipped), so the
        caller can save it before the graph completes; an exception (KeyboardInterrupt included) stops the
        workers at once and propagates.
        """
        given = dict(given or {})
        order = check_graph(tasks, given)
        by_id = {t.id: t for t in tasks}
        needed = {d for t in tasks for d in t.deps}
        waiting = list(order)
        for tid in waiting:
            on_event(Event(tid, "waiting"))
        outcomes: dict[str, Outcome] = {}
        handles: dict[str, Any] = {}
        attempts: dict[str, int] = {}
        started: dict[str, float] = {}
        running: set[str] = set()
        self._start(shared, given)
        try:
            handles.update({k: self._handle_given(k, v) for k, v in given.items() if k in needed})

            def finish(out: Outcome) -> None:
                outcomes[out.id] = out
                on_event(Event(out.id, "done" if out.ok else "skipped" if out.skipped else "failed", out.attempts,
                               out.time_s, out.error))
                on_result(out)

            def submit(tid: str) -> None:
                attempts[tid] = attempts.get(tid, 0) + 1
                started[tid] = time.perf_counter()
                running.add(tid)
                self._submit(by_id[tid], {d: handles[d] for d in by_id[tid].deps})
                on_event(Event(tid, "running", attempts[tid]))

            while waiting or running:
                before = len(waiting)
                for tid in list(waiting):
                    bad = [d for d in by_id[tid].deps if d in outcomes and not outcomes[d].ok]
                    if bad:
                        waiting.remove(tid)
                        finish(Outcome(tid, ok=False, skipped=True, error=f"not run: its input {bad[0]!r} failed"))
                    elif self._capacity() > 0 and all(d in handles for d in by_id[tid].deps):
                        waiting.remove(tid)
                        submit(tid)
                if not running:
                    if waiting and len(waiting) == before:  # pragma: no cover (check_graph rules this out)
                        raise RuntimeError(f"task graph: nothing can run, waiting for {waiting}")
                    continue
                for tid, ok, value, error, secs in self._wait():
                    running.discard(tid)
                    if ok:
                        handles[tid] = self._handle(tid, value, needed=tid in needed)
                        finish(Outcome(tid, ok=True, value=value, attempts=attempts[tid], time_s=secs))
                    elif attempts[tid] < self.max_attempts:
                        log.warning("task %s failed (attempt %d of %d), retrying: %s", tid, attempts[tid],
                                    self.max_attempts, last_line(error))
                        log.debug("task %s: %s", tid, error)
                        on_event(Event(tid, "retrying", attempts[tid], secs, last_line(error)))
                        submit(tid)
                    else:
                        log.error("task %s failed after %d attempts: %s", tid, attempts[tid], error)
                        finish(Outcome(tid, ok=False, error=last_line(error), attempts=attempts[tid], time_s=secs))
        except BaseException:
            self._stop(kill=True)
            raise
        self._stop(kill=False)
        return outcomes


def format_error(exc: BaseException) -> str:
    """``Type: message`` plus the traceback, as reported for a failed task."""
    import traceback

    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).strip()


def last_line(error: str | None) -> str:
    """The ``Type: message`` line of a formatted traceback."""
    lines = [ln for ln in (error or "unknown error").strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "unknown error"


def set_threads(n: int | None) -> int:
    """Set torch's thread count (None: unchanged); return the previous count."""
    import torch

    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    return before
