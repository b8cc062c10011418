"""A process's cache of verified API keys, invalidated at once when any process revokes a key (our own design).

Every request looked its key up in the key database (one round trip, on PostgreSQL the network's). The cache keeps
a key that authenticated, by the sha256 of the whole token, for at most ``ttl_s`` seconds, and only while the
key database's *revocation generation* has not moved since the key was read:

- SQLite (one host): ``KeyStore.revoke`` replaces a sidecar file next to the database (``keys.db-revocations``)
  after its commit; the generation is that file's identity (inode, size, mtime), one ``stat`` per request. Every
  worker and replica on the host sees a revocation on the first request that starts after ``revoke`` returned.
- PostgreSQL: ``revoke`` sends ``NOTIFY safedl_keys`` in its transaction (delivered at its commit); a listener
  thread per process (its own connection, ``LISTEN safedl_keys``) moves the generation when one arrives. Between
  the commit and the notification's delivery (a network hop) a cached key still passes; while the listener is
  not connected the cache is bypassed (every request reads the database), and on reconnecting it drops everything.

A revocation done another way (SQL by hand, an older safedl) is seen within ``ttl_s``. Only keys that
authenticated are cached: a wrong, unknown or revoked token always reads the database.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

CHANNEL = "safedl_keys"
DEFAULT_TTL_S = 2.0
MAX_ENTRIES = 10_000


def sidecar_path(db_path: Path) -> Path:
    """The SQLite key database's revocation file."""
    return db_path.with_name(db_path.name + "-revocations")


def signal_sqlite_revocation(db_path: Path) -> None:
    """Move the revocation generation of a SQLite key database (after the revoke's commit): an atomic replace, so
    the file's inode changes even where mtimes are coarse."""
    side = sidecar_path(db_path)
    tmp = side.with_name(f"{side.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(f"{time.time_ns()}\n")
    os.replace(tmp, side)


class SqliteGeneration:
    """The revocation generation of a SQLite key database: the sidecar file's identity."""

    def __init__(self, db_path: Path):
        self.path = sidecar_path(db_path)

    def __call__(self) -> Any:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return "none"
        except OSError:
            return None  # unknown: bypass the cache
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def close(self) -> None:
        """Nothing to release."""


class PostgresGeneration:
    """The revocation generation of a PostgreSQL key database: a counter moved by each ``NOTIFY safedl_keys``
    that a listener thread receives; None (bypass the cache) while the listener is not connected."""

    def __init__(self, conninfo: str, *, retry_s: float = 1.0):
        self._conninfo, self._retry_s = conninfo, retry_s
        self._gen, self._live = 0, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="safedl-key-revocations", daemon=True)
        self._thread.start()

    def __call__(self) -> Any:
        return self._gen if self._live else None

    def _run(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=3,
                                     application_name="safedl-key-revocations") as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._gen += 1  # whatever was cached before (a gap in listening) is dropped
                    self._live = True
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=0.5, stop_after=1):
                            self._gen += 1
            except Exception as exc:  # noqa: BLE001 - a lost listener only turns the cache off until it is back
                if self._live:
                    log.warning("key revocation listener lost (%s); the key cache is off until it reconnects", exc)
            self._live = False
            self._stop.wait(self._retry_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)


class VerifiedKeyCache:
    """``authenticate(token, lookup)``: the cached key of a token while its entry is younger than ``ttl_s`` and the
    revocation generation has not moved since it was read; else ``lookup(token)`` (the database), cached when it
    returns a key."""

    def __init__(self, generation: SqliteGeneration | PostgresGeneration, *, ttl_s: float = DEFAULT_TTL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.generation, self.ttl_s, self._clock = generation, float(ttl_s), clock
        self._entries: dict[str, tuple[Any, Any, float]] = {}
        self.hits = self.misses = 0

    def authenticate(self, token: str | None, lookup: Callable[[str | None], Any]) -> Any:
        gen = self.generation()  # read before the database, so a revocation during the lookup is not missed
        if gen is None or token is None:
            return lookup(token)
        digest = hashlib.sha256(token.encode()).hexdigest()
        entry = self._entries.get(digest)
        now = self._clock()
        if entry is not None and entry[1] == gen and now - entry[2] < self.ttl_s:
            self.hits += 1
            return entry[0]
        self.misses += 1
        key = lookup(token)
        if key is None:
            self._entries.pop(digest, None)
        else:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[digest] = (key, gen, now)
        return key

    def close(self) -> None:
        self.generation.close()
