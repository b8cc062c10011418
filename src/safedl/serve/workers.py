"""``safedl serve --workers N``: N worker processes on one listening socket of one host, under a supervisor.

Process model. The supervisor (the process started as ``safedl serve``) binds the listening socket once, makes a
fresh private directory for prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, removed at exit)
and starts the workers with the ``spawn`` start method: each is a fresh interpreter (nothing forked from a process
holding torch's threads or a lock), gets the picklable ``ServeOptions`` and the socket through its start pipe (the
signing key never goes through an environment variable or a command line), loads and verifies the bundle itself,
opens the stores, builds its own guarded protocol class (serve/protocol.py: the connection table is per process)
and serves the shared socket; the kernel hands each new connection to one of them. Worker 0 starts first: a bundle
or database that refuses to load ends the start with that worker's message and exit status (2), said once; the
others start once it serves.

Signals. SIGTERM or SIGINT to the supervisor: SIGTERM to every worker (each stops accepting, lets its in-flight
requests finish, drains its model queue and flushes its audit, as one server does), then the supervisor exits with
the signal's status; a second signal forces (SIGINT to the workers, uvicorn's forced exit), and a worker still
running ``graceful_s`` + 30 s later is killed. SIGHUP is forwarded to every serving worker (each reloads the bundle
as one server does; a worker still starting gets it once it serves). A worker whose supervisor is gone stops itself.

Supervision. A worker that dies is restarted in its slot, at most ``RESTARTS_PER_MINUTE`` restarts a minute in all
(each logged; past the budget a slot waits for it while the others serve). A dead worker's live gauges are dropped
(``multiprocess.mark_process_dead``); its counters stay, so totals never go back.

Per worker, not shared: the security monitor's windows and its PRADA and volume state, the failed-authentication
budget of a client address (serve/unauth.py) and the connection limits. Shared through the databases: keys, rate
limits, quotas, key actions, the audit and the stateful detector's per-key query history (serve/stores/history.py;
SQLite in WAL mode across the processes of one host, or PostgreSQL across hosts).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

import uvicorn

from safedl.errors import UserError
from safedl.serve.metrics import MULTIPROC_ENV
from safedl.serve.options import ServeOptions

log = logging.getLogger("safedl.serve.workers")
RESTARTS_PER_MINUTE = 5
STOP_MARGIN_S = 30.0   # beyond graceful_s: the model queue, the audit flush and the WAL checkpoint
POLL_S = 0.2
BACKLOG = 2048         # uvicorn's default


# -- the worker process ------------------------------------------------------------------------------------------
class NotifyingServer(uvicorn.Server):
    """A uvicorn server that calls ``on_started()`` once it serves its sockets."""

    def __init__(self, config: uvicorn.Config, *, on_started: Callable[[], None]):
        super().__init__(config)
        self.on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            self.on_started()


def serve_on_socket(options: ServeOptions, *, sock: socket.socket, worker: int,
                    on_started: Callable[[], None]) -> int:
    """Serve ``sock`` in this process until SIGTERM/SIGINT (then uvicorn re-raises the signal); 3 if it did not
    start. Raises UserError for a bad bundle or database."""
    from safedl.serve.server import prepare_server, uvicorn_settings

    app, protocol = prepare_server(options, log_fields={"role": "worker", "worker": worker, "pid": os.getpid()})
    config = uvicorn.Config(app, host=options.host, port=options.port, **uvicorn_settings(options, protocol=protocol))
    server = NotifyingServer(config, on_started=on_started)
    server.run(sockets=[sock])
    return 0 if server.started else 3


def watch_parent(parent_pid: int, *, interval_s: float = 1.0) -> threading.Thread:
    """Stop this process (SIGTERM: gracefully) once its supervisor ``parent_pid`` is gone."""
    def run() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        log.warning("the supervisor (pid %d) is gone: stopping", parent_pid, extra={"event": "orphaned"})
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=run, name="safedl-supervisor-watch", daemon=True)
    thread.start()
    return thread


def worker_main(*, options: ServeOptions, sock: socket.socket, index: int, ready: Connection,
                parent_pid: int) -> None:
    """A worker process (the spawn target): serve ``sock``; ``ready`` receives this pid once it serves."""
    watch_parent(parent_pid)
    try:
        code = serve_on_socket(options, sock=sock, worker=index, on_started=lambda: ready.send(os.getpid()))
    except UserError as exc:
        sys.stderr.write(f"error: {exc}\n")
        code = 2
    except KeyboardInterrupt:  # SIGINT re-raised after the graceful shutdown
        code = 0
    sys.exit(code)


# -- the supervisor ----------------------------------------------------------------------------------------------
def bind_socket(*, host: str, port: int) -> socket.socket:
    """The listening socket all workers serve (IPv6 for an IPv6 address); UserError if it cannot listen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot listen ({exc.strerror or exc})") from None
    return sock


class RestartBudget:
    """At most ``limit`` restarts in any ``window_s`` seconds."""

    def __init__(self, *, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.limit, self.window_s, self.clock = int(limit), float(window_s), clock
        self._times: deque[float] = deque()

    def try_spend(self) -> float | None:
        """Spend one restart now (None), or say when the next one is allowed (a ``clock`` time)."""
        now = self.clock()
        while self._times and now - self._times[0] >= self.window_s:
            self._times.popleft()
        if len(self._times) < self.limit:
            self._times.append(now)
            return None
        return self._times[0] + self.window_s


@dataclass
class WorkerSlot:
    """One worker's place: its process (None while dead), start pipe and state."""

    index: int
    process: Any = None                 # a spawn-context multiprocessing.Process
    ready_conn: Connection | None = None
    serving: bool = False
    ever_served: bool = False
    reload_pending: bool = False        # a SIGHUP came while it was starting
    restart_at: float | None = None     # when a dead slot may be restarted (monotonic)


class Supervisor:
    """Starts, watches and stops the workers of ``options`` on ``sock`` (see the module docstring)."""

    def __init__(self, *, options: ServeOptions, sock: socket.socket, metrics_dir: str):
        self.options, self.sock, self.metrics_dir = options, sock, metrics_dir
        self.ctx = multiprocessing.get_context("spawn")
        self.slots = [WorkerSlot(index=i) for i in range(options.workers)]
        self.budget = RestartBudget(limit=RESTARTS_PER_MINUTE, window_s=60.0)
        self.stop_signal: int | None = None
        self.forced = self.hup = self.all_started = False
        self.failure: int | None = None  # exit status of a worker that could not start

    def run(self) -> tuple[int | None, int]:
        """Serve until a stop signal: (that signal or None, exit status of a failed start or 0)."""
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            self._spawn(self.slots[0])
            while self.stop_signal is None and self.failure is None:
                self._step()
            self._stop_all()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.stop_signal, self.failure or 0

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGHUP:
            self.hup = True
        elif self.stop_signal is None:
            self.stop_signal = signum
        else:
            self.forced = True

    def _spawn(self, slot: WorkerSlot) -> None:
        reader, writer = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=worker_main, name=f"safedl-worker-{slot.index}",
                                kwargs={"options": self.options, "sock": self.sock, "index": slot.index,
                                        "ready": writer, "parent_pid": os.getpid()})
        proc.start()
        writer.close()
        slot.process, slot.ready_conn, slot.serving, slot.restart_at = proc, reader, False, None
        log.info("worker %d starting (pid %d)", slot.index, proc.pid,
                 extra={"event": "worker_start", "worker": slot.index, "worker_pid": proc.pid})

    def _step(self) -> None:
        if self.hup:
            self.hup = False
            self._forward_hup()
        ready = {s.ready_conn: s for s in self.slots if s.ready_conn is not None}
        exits = {s.process.sentinel: s for s in self.slots if s.process is not None}
        fired = wait([*ready, *exits], timeout=POLL_S)
        for obj in fired:  # a worker that announced itself and died: its announcement first
            if obj in ready:
                self._on_ready(ready[obj])
        for obj in fired:
            if obj in exits:
                self._on_exit(exits[obj])
        self._restart_due()

    def _on_ready(self, slot: WorkerSlot) -> None:
        conn, slot.ready_conn = slot.ready_conn, None
        try:
            pid = conn.recv()
        except (EOFError, OSError):
            return  # it died before serving; its exit is handled next
        finally:
            conn.close()
        slot.serving = slot.ever_served = True
        log.info("worker %d serving (pid %d)", slot.index, pid,
                 extra={"event": "worker_ready", "worker": slot.index, "worker_pid": pid})
        if slot.reload_pending:
            slot.reload_pending = False
            os.kill(pid, signal.SIGHUP)
        if not self.all_started:
            self.all_started = True
            for other in self.slots[1:]:
                self._spawn(other)
        if all(s.serving for s in self.slots):
            log.info("serving with %d workers", len(self.slots), extra={"event": "workers_ready"})

    def _on_exit(self, slot: WorkerSlot) -> None:
        proc = self._reap(slot)
        if self.stop_signal is not None:
            return
        if not slot.ever_served and not all(s.ever_served for s in self.slots):
            code = proc.exitcode
            self.failure = code if code is not None and code > 0 else 1
            log.error("worker %d exited (%s) before it served: stopping", slot.index, _status(code),
                      extra={"event": "worker_failed", "worker": slot.index, "exit": code})
            return
        slot.restart_at = time.monotonic()
        log.warning("worker %d (pid %d) exited (%s): restarting it", slot.index, proc.pid, _status(proc.exitcode),
                    extra={"event": "worker_exit", "worker": slot.index, "worker_pid": proc.pid,
                           "exit": proc.exitcode})

    def _reap(self, slot: WorkerSlot) -> Any:
        """Collect a dead worker's status, drop its live gauges and free the slot; the process object."""
        from prometheus_client import multiprocess

        proc = slot.process
        proc.join()
        multiprocess.mark_process_dead(proc.pid, self.metrics_dir)
        if slot.ready_conn is not None:
            slot.ready_conn.close()
        slot.process, slot.ready_conn, slot.serving = None, None, False
        return proc

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.process is not None or slot.restart_at is None or now < slot.restart_at:
                continue
            later = self.budget.try_spend()
            if later is None:
                self._spawn(slot)
            else:
                slot.restart_at = later
                log.error("worker %d not restarted: %d restarts in the last minute already; next try in %.0f s",
                          slot.index, RESTARTS_PER_MINUTE, later - now,
                          extra={"event": "worker_restart_deferred", "worker": slot.index})

    def _forward_hup(self) -> None:
        sent = 0
        for slot in self.slots:
            if slot.process is None:
                continue  # a dead slot loads the bundle path afresh when restarted
            if slot.serving:
                os.kill(slot.process.pid, signal.SIGHUP)
                sent += 1
            else:
                slot.reload_pending = True
        log.info("SIGHUP forwarded to %d workers", sent, extra={"event": "workers_reload", "workers": sent})

    def _stop_all(self) -> None:
        """SIGTERM to every worker, wait for them (a second signal forces), kill the ones left at the deadline."""
        self.sock.close()  # once the workers have closed theirs, a new connection is refused, not left waiting
        self._signal_all(signal.SIGTERM)
        deadline, forced = time.monotonic() + float(self.options.graceful_s) + STOP_MARGIN_S, False
        while any(s.process is not None for s in self.slots) and time.monotonic() < deadline:
            if self.forced and not forced:
                forced = True
                self._signal_all(signal.SIGINT)
            exits = {s.process.sentinel: s for s in self.slots if s.process is not None}
            for obj in wait(list(exits), timeout=POLL_S):
                proc = self._reap(exits[obj])
                log.info("worker %d stopped (%s)", exits[obj].index, _status(proc.exitcode),
                         extra={"event": "worker_stop", "worker": exits[obj].index, "exit": proc.exitcode})
        for slot in self.slots:
            if slot.process is not None:
                log.error("worker %d (pid %d) still running after %.0f s: killed", slot.index, slot.process.pid,
                          self.options.graceful_s + STOP_MARGIN_S, extra={"event": "worker_killed"})
                slot.process.kill()
                self._reap(slot)

    def _signal_all(self, signum: int) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.pid is not None:
                try:
                    os.kill(slot.process.pid, signum)
                except ProcessLookupError:
                    pass


def _status(code: int | None) -> str:
    """A process's exit code in words."""
    if code is None:
        return "unknown status"
    if code >= 0:
        return f"status {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


def run_workers(options: ServeOptions) -> int:
    """Serve with ``options.workers`` worker processes until SIGTERM/SIGINT, then exit by that signal as one server
    does; returns the exit status of a worker that could not start (2: a bad bundle or database). Raises UserError
    when the address cannot be listened on."""
    from safedl.serve.logs import setup_json_logging
    from safedl.serve.server import warn_if_exposed

    setup_json_logging(getattr(logging, options.log_level.upper(), logging.INFO),
                       fields={"role": "supervisor", "pid": os.getpid()})
    sock = bind_socket(host=options.host, port=options.port)
    warn_if_exposed(options.host)
    metrics_dir = tempfile.mkdtemp(prefix="safedl-metrics-")  # mode 0700: this user's only
    saved = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = metrics_dir  # before a worker starts, so its prometheus_client sees it at import
    log.info("starting %d workers on %s:%d", options.workers, options.host, options.port,
             extra={"event": "workers_start", "workers": options.workers, "metrics_dir": metrics_dir})
    try:
        signum, failure = Supervisor(options=options, sock=sock, metrics_dir=metrics_dir).run()
    finally:
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if saved is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = saved
    log.info("all workers stopped", extra={"event": "workers_stopped", "signal": signum})
    if signum is not None:
        try:
            signal.raise_signal(signum)  # the handlers are restored: exit by the signal, as uvicorn does
        except KeyboardInterrupt:  # SIGINT: what uvicorn.run does with it
            pass
    return failure
