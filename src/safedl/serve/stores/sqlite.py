"""The SQLite settings of every store's connections (one shared implementation): WAL (readers never block the
writer; a committed transaction survives a killed process), a busy timeout, and no transaction begun by the
driver: a single statement runs atomically by itself, and a write transaction (engine.write) takes the write lock
up front (``BEGIN IMMEDIATE``) instead of failing when a read would have to upgrade."""
from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

BUSY_TIMEOUT_MS = 5000
SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


def configure(dbapi_conn: Any, *, synchronous: str = "NORMAL") -> None:
    """Set WAL, the busy timeout and ``synchronous`` on a new DBAPI (sqlite3) connection."""
    dbapi_conn.isolation_level = None  # the driver starts no transaction by itself: ``begin`` below does
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
    finally:
        cur.close()


def install(engine: Engine, *, synchronous: str = "NORMAL") -> None:
    """Configure every connection of ``engine``: statements run in autocommit unless a transaction is begun
    explicitly (engine.write: ``BEGIN IMMEDIATE``)."""
    if synchronous.upper() not in SYNCHRONOUS:
        raise ValueError(f"synchronous={synchronous!r}: choose one of {', '.join(SYNCHRONOUS)}")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, record: Any) -> None:
        configure(dbapi_conn, synchronous=synchronous.upper())


def set_max_pages(dbapi_conn: Any, pages: int) -> None:
    """The file may not grow past ``pages`` pages (a write beyond fails: SQLITE_FULL)."""
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA max_page_count={max(1, int(pages))}")
    finally:
        cur.close()
