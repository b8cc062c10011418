"""Executors: who runs a graph of picklable tasks with dependencies (serial, a local process pool, Ray).

They know nothing of attacks, defenses or run directories: the run spine (``safedl.assess.pipeline``) builds the
graph and writes what each task returns. ``create_executor(name, **options)`` builds one by name.
"""
from __future__ import annotations

from typing import Any

from safedl.errors import ConfigError
from safedl.executors.base import Executor
from safedl.executors.graph import Event, Outcome, Task, check_graph

EXECUTORS = ("serial", "process", "ray")


def create_executor(name: str, **options: Any) -> Executor:
    """``serial`` | ``process`` | ``ray`` with its options (``workers``, ``threads_per_task``; process: ``preload``;
    Ray: ``address``, ``gpus_per_task``); options another executor does not use are ignored."""
    if name == "serial":
        from safedl.executors.serial import SerialExecutor

        options.pop("address", None), options.pop("gpus_per_task", None), options.pop("preload", None)
        return SerialExecutor(**options)
    if name == "process":
        from safedl.executors.process import ProcessExecutor

        options.pop("address", None), options.pop("gpus_per_task", None)
        return ProcessExecutor(**options)
    if name == "ray":
        from safedl.executors.ray import RayExecutor

        options.pop("preload", None)
        return RayExecutor(**options)
    raise ConfigError(f"unknown executor {name!r}; executors are: {', '.join(EXECUTORS)}")


__all__ = ["EXECUTORS", "Event", "Executor", "Outcome", "Task", "check_graph", "create_executor"]
