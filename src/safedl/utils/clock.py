"""Wall and CPU time of one stage, as recorded in its results.json entry (``time_s``, ``cpu_s``)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class StageClock:
    """Started at construction; ``wall()`` is perf_counter seconds, ``cpu()`` this process's CPU seconds (every
    thread, user + system: ``time.process_time``), both since the start.

    CPU seconds are what a stage costs on an idle machine; wall seconds on a shared one also count the time other
    processes held the cores.
    """

    t0: float = field(default_factory=time.perf_counter)
    c0: float = field(default_factory=time.process_time)

    def wall(self) -> float:
        return time.perf_counter() - self.t0

    def cpu(self) -> float:
        return time.process_time() - self.c0
