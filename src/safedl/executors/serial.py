"""The serial executor: every task in this process, one at a time, in dependency order (the default)."""
from __future__ import annotations

import time
from typing import Any, Mapping

from safedl.registry import register
from safedl.executors.base import Executor, format_error, set_threads
from safedl.executors.graph import Task


@register("executor", "serial")
class SerialExecutor(Executor):
    """Runs tasks in the calling process; values are passed by reference and nothing is pickled."""

    name = "serial"
    in_process = True

    def _start(self, shared: Any, given: Mapping[str, Any]) -> None:
        self._shared, self._queued = shared, None

    def _capacity(self) -> int:
        return 0 if self._queued is not None else 1

    def _submit(self, task: Task, deps: Mapping[str, Any]) -> None:
        self._queued = (task, deps)

    def _wait(self) -> list[tuple[str, bool, Any, str | None, float]]:
        task, deps = self._queued
        self._queued = None
        before = set_threads(self.threads_per_task)
        t0 = time.perf_counter()
        try:
            value = task.fn(self._shared, dict(deps), **task.kwargs)
        except Exception as exc:  # KeyboardInterrupt and SystemExit propagate
            return [(task.id, False, None, format_error(exc), time.perf_counter() - t0)]
        finally:
            set_threads(before)
        return [(task.id, True, value, None, time.perf_counter() - t0)]

    def _stop(self, *, kill: bool) -> None:
        self._shared = self._queued = None
