"""Executors: who runs a graph of picklable tasks with dependencies (serial, a local process pool, Ray).

They know nothing of attacks, defenses or run directories: the run spine (``safedl.run``) builds the graph and
writes what each task returns. Executors are registry kind ``executor``; ``create_executor(name, **options)``
builds one by name.
"""
from __future__ import annotations

from typing import Any

from safedl import registry
from safedl.errors import ConfigError
from safedl.executors.base import Executor
from safedl.executors.graph import Event, Outcome, Task, check_graph

#: the executors' registry names (the profile's ``execution.executor`` values)
EXECUTORS = ("serial", "process", "ray")
#: the modules that register executors (``safedl.registry`` imports exactly these; ray is imported only when used)
COMPONENT_MODULES: tuple[str, ...] = ("serial", "process", "ray")


def create_executor(name: str, **options: Any) -> Executor:
    """``serial`` | ``process`` | ``ray`` with its options (``workers``, ``threads_per_task``; process: ``preload``;
    Ray: ``address``, ``gpus_per_task``); options another executor does not use are ignored."""
    if name not in registry.names("executor"):
        raise ConfigError(f"unknown executor {name!r}; executors are: {', '.join(EXECUTORS)}")
    accepted = {p.name for p in registry.params("executor", name)}
    return registry.get("executor", name)(**{k: v for k, v in options.items() if k in accepted})


__all__ = ["EXECUTORS", "Event", "Executor", "Outcome", "Task", "check_graph", "create_executor"]
