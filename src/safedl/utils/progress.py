"""Progress bars (rich) for long work; silent when disabled or when stderr is not a terminal."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

_enabled: bool | None = None


def set_enabled(flag: bool | None) -> None:
    """Force progress bars on or off (None: on only when stderr is a terminal)."""
    global _enabled
    _enabled = flag


def enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return sys.stderr.isatty() and not os.environ.get("SAFEDL_NO_PROGRESS")


class _Null:
    def advance(self, n: float = 1) -> None:
        pass

    def update(self, **kwargs: object) -> None:
        pass


class _Bar:
    def __init__(self, progress, task) -> None:
        self._p, self._t = progress, task

    def advance(self, n: float = 1) -> None:
        self._p.advance(self._t, n)

    def update(self, **kwargs: object) -> None:
        self._p.update(self._t, **kwargs)


@contextlib.contextmanager
def progress_bar(total: float | None, description: str) -> Iterator[_Null | _Bar]:
    """A rich progress bar with ``advance(n)`` and ``update(description=...)``."""
    if not enabled():
        yield _Null()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), transient=True) as p:
        yield _Bar(p, p.add_task(description, total=total))


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Progress bars off inside the block (e.g. under a live view that already shows the work), restored after."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before
