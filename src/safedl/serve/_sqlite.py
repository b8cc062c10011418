"""SQLite connections shared by the key store, rate limiter and audit store: WAL, a busy timeout, one connection
per thread (sqlite3 connections must not be shared between threads without a lock)."""
from __future__ import annotations

import sqlite3
import threading
import weakref
from pathlib import Path

BUSY_TIMEOUT_MS = 5000


def connect(path: str | Path, *, synchronous: str = "NORMAL") -> sqlite3.Connection:
    """Open ``path`` in WAL mode (readers never block the writer; a committed transaction survives a killed process)."""
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


class _Owned:
    """A thread's connection, closed when the thread's local storage lets go of it (the thread ended)."""

    __slots__ = ("conn", "__weakref__")

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __del__(self) -> None:
        try:
            self.conn.close()
        except sqlite3.Error:
            pass


class PerThread:
    """One connection per thread to the same database file, created on first use and closed when its thread ends:
    worker pools (anyio's) retire idle threads and start new ones, so keeping every thread's connection would
    grow the process by one connection (descriptors, page cache) per thread ever started."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._local = threading.local()
        self._live: weakref.WeakSet[_Owned] = weakref.WeakSet()
        self._lock = threading.Lock()

    def get(self) -> sqlite3.Connection:
        owned = getattr(self._local, "owned", None)
        if owned is None:
            owned = _Owned(connect(self.path))
            self._local.owned = owned
            with self._lock:
                self._live.add(owned)
        return owned.conn

    def close(self) -> None:
        with self._lock:
            live = list(self._live)
            self._live.clear()
        for owned in live:
            try:
                owned.conn.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()


class immediate:
    """``with immediate(conn):`` one write transaction taken up front (BEGIN IMMEDIATE), rolled back on error."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        return False
