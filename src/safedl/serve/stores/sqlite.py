"""The SQLite settings of every store's connections (one shared implementation): WAL (readers never block the
writer; a committed transaction survives a killed process), a busy timeout, and transactions begun by us, so that
a write transaction can take the write lock up front (``BEGIN IMMEDIATE``) instead of failing on upgrade."""
from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

BUSY_TIMEOUT_MS = 5000
SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
WRITE_OPTION = "safedl_write"  # execution option: this transaction writes (BEGIN IMMEDIATE on SQLite)


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
    """Configure every connection of ``engine``; a connection carrying the ``safedl_write`` execution option begins
    its transaction with ``BEGIN IMMEDIATE`` (reads run statement by statement, in autocommit)."""
    if synchronous.upper() not in SYNCHRONOUS:
        raise ValueError(f"synchronous={synchronous!r}: choose one of {', '.join(SYNCHRONOUS)}")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, record: Any) -> None:
        configure(dbapi_conn, synchronous=synchronous.upper())

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get(WRITE_OPTION, False):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        # a read runs in autocommit: each statement is its own consistent snapshot, no BEGIN/ROLLBACK round


def set_max_pages(dbapi_conn: Any, pages: int) -> None:
    """The file may not grow past ``pages`` pages (a write beyond fails: SQLITE_FULL)."""
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA max_page_count={max(1, int(pages))}")
    finally:
        cur.close()
