"""Task functions for the executor tests (importable by process and Ray workers)."""
from __future__ import annotations

import os
import time
from pathlib import Path

UNPICKLED = 0  # how often this process unpickled a Shared


class Shared:
    """A shared object that counts how often a worker process received it."""

    def __init__(self, base: int):
        self.base = base

    def __setstate__(self, state: dict) -> None:
        global UNPICKLED
        UNPICKLED += 1
        self.__dict__.update(state)


def add(shared, inputs, *, k: int):
    """shared.base + k + the sum of the inputs: the value tells which inputs a task saw."""
    return shared.base + k + sum(inputs.values())


def whoami(shared, inputs, *, sleep: float = 0.0):
    """(pid, how often this process received the shared object, torch threads)."""
    import torch

    time.sleep(sleep)
    return os.getpid(), UNPICKLED, torch.get_num_threads()


def boom(shared, inputs):
    raise ValueError("planted failure")


def flaky(shared, inputs, *, marker: str):
    """Fails on the first attempt (leaves ``marker``), succeeds on the second."""
    path = Path(marker)
    if not path.exists():
        path.write_text("tried")
        raise RuntimeError("first attempt fails")
    return "second attempt"


def die(shared, inputs):
    """The worker process dies without raising (as if killed)."""
    os._exit(3)


def sleep_then(shared, inputs, *, seconds: float, value):
    time.sleep(seconds)
    return value


def empty(shared, inputs):
    return None


def on_node(shared, inputs, *, seconds: float, markers: str, name: str):
    """Leave a marker naming this task and its node, sleep, return the node id (a task to lose a node under)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    (Path(markers) / f"{name}@{node}").write_text("")
    time.sleep(seconds)
    return node
