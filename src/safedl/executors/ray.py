"""The Ray executor: tasks on a Ray cluster, a local one started on demand or an existing one (``ray://...``, ``auto``).

The shared object is ``ray.put`` once and every task gets its reference; a worker process fetches it on its first
task and keeps it for the next ones (once per worker, not per task). A finished value that other tasks need is
put once by the driver, so it lives on the driver's node and survives the loss of the node that computed it; tasks
receive their inputs as top-level references, so Ray starts a task only when its inputs are ready. Finished tasks
are collected with ``ray.wait`` and fetched together. Each task asks for ``threads_per_task`` CPUs and, when set,
``gpus_per_task`` of a GPU, so stages share the cluster's GPUs. Ray's own retries are off: the shared loop retries
a failed task once, whether it raised or its worker or node died.

Moritz et al., "Ray: A Distributed Framework for Emerging AI Applications", OSDI 2018.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Mapping

from safedl.errors import ConfigError, UserError
from safedl.registry import register
from safedl.executors.base import Executor, format_error, set_threads
from safedl.executors.graph import Task

log = logging.getLogger(__name__)
_SHARED: dict[str, Any] = {}  # in a worker: shared object by reference id (fetched once per worker)
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2


def _ray_task(fn, box: list, names: list[str], threads: int | None, kwargs: dict, *inputs: Any):  # pragma: no cover
    import ray

    ref = box[0]
    key = ref.hex()
    if key not in _SHARED:
        _SHARED.clear()  # a new run: drop the previous run's shared object
        _SHARED[key] = ray.get(ref)
    set_threads(threads)
    t0 = time.perf_counter()
    try:
        return True, fn(_SHARED[key], dict(zip(names, inputs)), **kwargs), None, time.perf_counter() - t0
    except Exception as exc:
        return False, None, format_error(exc), time.perf_counter() - t0


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("the ray executor needs Ray: pip install 'safedl[ray]'") from None
    return ray


@register("executor", "ray")
class RayExecutor(Executor):
    """Ray tasks. ``address``: None starts a local Ray with ``workers`` CPUs (default: all) and shuts it down after
    the run; ``"auto"`` or ``"ray://host:10001"`` connects to a running cluster. ``workers`` also caps the tasks in
    flight. ``gpus_per_task``: the GPU share each task asks for (with ``--device cuda``)."""

    name = "ray"

    def __init__(self, *, address: str | None = None, gpus_per_task: float | None = None,
                 workers: int | None = None, threads_per_task: int | None = None, max_attempts: int = 2):
        super().__init__(workers=workers, threads_per_task=threads_per_task, max_attempts=max_attempts)
        if gpus_per_task is not None and not 0 < gpus_per_task <= 1:
            raise ConfigError(f"ray executor: gpus_per_task must be in (0, 1], got {gpus_per_task!r}")
        self.address, self.gpus_per_task = address, gpus_per_task

    def _start(self, shared: Any, given: Mapping[str, Any]) -> None:
        ray = self._ray = import_ray()
        self._owns = not ray.is_initialized()
        if self._owns:
            if self.address is None:  # "local": a new Ray of our own, never another cluster found on this machine
                ray.init(address="local", num_cpus=self.workers or os.cpu_count(), include_dashboard=False,
                         logging_level=logging.WARNING, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                         configure_logging=False)
            else:
                try:
                    ray.init(address=self.address, logging_level=logging.WARNING, configure_logging=False)
                except (ConnectionError, ValueError) as exc:
                    raise UserError(f"--ray-address {self.address}: cannot connect to a Ray cluster ({exc})") from None
        self._remote = ray.remote(_ray_task)
        self._shared = ray.put(shared)
        self._refs: dict[Any, tuple[str, float]] = {}

    def _capacity(self) -> int:
        return (self.workers - len(self._refs)) if self.workers else 1 << 30

    def _handle(self, task_id: str, value: Any, *, needed: bool) -> Any:
        return self._ray.put(value) if needed else None

    def _handle_given(self, task_id: str, value: Any) -> Any:
        return self._ray.put(value)

    def _submit(self, task: Task, deps: Mapping[str, Any]) -> None:
        opts: dict[str, Any] = {"num_cpus": self.threads_per_task or 1, "max_retries": 0, "name": task.id}
        if self.gpus_per_task:
            opts["num_gpus"] = self.gpus_per_task
        ref = self._remote.options(**opts).remote(task.fn, [self._shared], list(deps), self.threads_per_task or 1,
                                                  dict(task.kwargs), *deps.values())
        self._refs[ref] = (task.id, time.perf_counter())

    def _wait(self) -> list[tuple[str, bool, Any, str | None, float]]:
        ray = self._ray
        ready, _ = ray.wait(list(self._refs), num_returns=1)
        ready, _ = ray.wait(list(self._refs), num_returns=len(self._refs), timeout=0) if len(self._refs) > 1 \
            else (ready, None)
        try:
            values = ray.get(ready)  # all finished already: one call, no waiting
        except ray.exceptions.RayError:
            values = []
            for ref in ready:  # one of them died with its worker or node: find which
                try:
                    values.append(ray.get(ref))
                except ray.exceptions.RayError as exc:
                    secs = time.perf_counter() - self._refs[ref][1]
                    values.append((False, None, f"{type(exc).__name__}: {exc}", secs))
        out = []
        for ref, (ok, value, error, secs) in zip(ready, values):
            out.append((self._refs.pop(ref)[0], ok, value, error, secs))
        return out

    def _stop(self, *, kill: bool) -> None:
        ray = getattr(self, "_ray", None)
        if ray is None:
            return
        if kill:
            for ref in list(getattr(self, "_refs", {})):
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 (already finished or gone)
                    pass
        self._refs, self._shared = {}, None
        if self._owns and ray.is_initialized():
            ray.shutdown()
