"""The process executor: a pool of worker processes on this machine.

Each worker is forked from a ``forkserver`` process (a clean interpreter that imported ``preload`` once; never a
fork of the driver, which may already run torch threads), receives the shared object once when it starts, then
runs one task at a time. The driver knows which task each worker runs, so a worker that dies (killed, out of
memory, a crash in native code) fails exactly that task; the worker is replaced and the task retried. Workers
ignore Ctrl-C; the driver terminates them instead.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import signal
import time
from multiprocessing.connection import Connection, wait
from typing import Any, Mapping

from safedl.registry import register
from safedl.executors.base import Executor, format_error, set_threads
from safedl.executors.graph import Task

log = logging.getLogger(__name__)


def _worker_main(conn: Connection, threads: int | None) -> None:  # pragma: no cover (runs in the child)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_threads(threads)
    shared = pickle.loads(conn.recv_bytes())
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        tid, fn, deps, kwargs = msg
        set_threads(threads)  # per task: a task may have changed it
        t0 = time.perf_counter()
        try:
            reply = (tid, True, fn(shared, deps, **kwargs), None, 0.0)
        except Exception as exc:
            reply = (tid, False, None, format_error(exc), 0.0)
        reply = reply[:4] + (time.perf_counter() - t0,)
        try:
            conn.send(reply)
        except Exception as exc:  # e.g. a value that cannot be pickled
            conn.send((tid, False, None, f"could not send the result back: {format_error(exc)}", reply[4]))


class _Worker:
    def __init__(self, ctx: Any, payload: bytes, threads: int | None):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, threads), daemon=True)
        self.proc.start()
        child.close()
        self.conn.send_bytes(payload)
        self.task: str | None = None
        self.started = 0.0


@register("executor", "process")
class ProcessExecutor(Executor):
    """A local process pool; ``workers`` defaults to the number of CPUs divided by ``threads_per_task``, which
    defaults to the number of CPUs divided by ``workers``."""

    name = "process"

    def __init__(self, *, preload: tuple[str, ...] = ("torch",), workers: int | None = None,
                 threads_per_task: int | None = None, max_attempts: int = 2):
        super().__init__(workers=workers, threads_per_task=threads_per_task, max_attempts=max_attempts)
        self.preload = tuple(preload)  # modules the fork server imports once; workers fork with them loaded

    def resolved(self) -> tuple[int, int]:
        cpus = os.cpu_count() or 1
        n = self.workers or max(1, cpus // (self.threads_per_task or 1))
        return n, self.threads_per_task or max(1, cpus // n)  # never more threads than cores in all

    def _start(self, shared: Any, given: Mapping[str, Any]) -> None:
        n, self._threads = self.resolved()
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload(list(self.preload))
        self._payload = pickle.dumps(shared, protocol=pickle.HIGHEST_PROTOCOL)  # pickled once for every worker
        self._n = n
        self._pool: list[_Worker] = []

    def _idle(self) -> _Worker | None:
        for w in self._pool:
            if w.task is None:
                return w
        if len(self._pool) < self._n:
            self._pool.append(_Worker(self._ctx, self._payload, self._threads))
            return self._pool[-1]
        return None

    def _capacity(self) -> int:
        return sum(w.task is None for w in self._pool) + self._n - len(self._pool)

    def _submit(self, task: Task, deps: Mapping[str, Any]) -> None:
        w = self._idle()
        assert w is not None
        w.task, w.started = task.id, time.perf_counter()
        try:
            w.conn.send((task.id, task.fn, dict(deps), dict(task.kwargs)))
        except (BrokenPipeError, ConnectionResetError, EOFError):
            pass  # the worker died; _wait reports it through its sentinel

    def _wait(self) -> list[tuple[str, bool, Any, str | None, float]]:
        busy = [w for w in self._pool if w.task is not None]
        ready = wait([w.conn for w in busy] + [w.proc.sentinel for w in busy])
        done = []
        for w in busy:
            dead = w.proc.sentinel in ready
            if w.conn in ready:
                try:
                    tid, ok, value, error, secs = w.conn.recv()
                except (EOFError, OSError):
                    dead = True  # the pipe closed: the worker died
                else:
                    done.append((tid, ok, value, error, secs))
                    w.task = None
                    continue
            if dead:
                w.proc.join(5)
                done.append((w.task, False, None, f"WorkerDied: worker process {w.proc.pid} died "
                             f"(exit code {w.proc.exitcode}) while running the task", time.perf_counter() - w.started))
                self._pool.remove(w)
                w.conn.close()
        return done

    def _stop(self, *, kill: bool) -> None:
        for w in self._pool:
            if kill:
                w.proc.terminate()
            else:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
        for w in self._pool:
            w.proc.join(5)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(1)
            w.conn.close()
        self._pool = []
