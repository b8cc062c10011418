"""PATH_OR_URL -> an SQLAlchemy Engine: the one place that knows which databases the service's stores can live in.

- a plain file path (``keys.db``) or ``sqlite:///PATH``: SQLite (WAL, busy timeout: serve/stores/sqlite.py), for
  one host (threads and ``--workers`` processes);
- ``postgresql://...`` (run with psycopg 3, as ``postgresql+psycopg://``) or ``postgresql+psycopg://...``:
  PostgreSQL, for workers and replicas on several hosts;
- anything else: UserError (exit 2) naming the flag, the value (its password hidden) and what is allowed, before
  anything is created.

Every engine has a bounded pool with a short checkout timeout: when all its connections are busy (or the server
is unreachable) a store call raises ``StoreUnavailable`` within seconds and the service answers 503; it never hangs.
"""
from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.engine.url import URL

from safedl.errors import SafedlError, UserError
from safedl.serve.stores import sqlite as sqlite_settings

POOL_SIZE = 8            # connections kept per engine (per process)
MAX_OVERFLOW = 8         # more, opened under load and closed when returned
POOL_TIMEOUT_S = 3.0     # waiting for a free connection longer than this raises StoreUnavailable (503)
CONNECT_TIMEOUT_S = 3    # PostgreSQL: giving up on an unreachable server
STATEMENT_TIMEOUT_MS = 10_000  # PostgreSQL: no statement (or lock wait) holds a request longer than this
MIN_SQLITE = (3, 35, 0)   # INSERT ... ON CONFLICT DO UPDATE ... RETURNING
ALLOWED = ("a SQLite file path (keys.db), sqlite:///PATH, postgresql://USER[:PASSWORD]@HOST[:PORT]/DB or "
           "postgresql+psycopg://...")
# "scheme:/" at the start also catches a URL that went through Path(), which collapses "//" ("postgresql:/u@h/db")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:(/|$)")
_TARGETS: "weakref.WeakKeyDictionary[Engine, Target]" = weakref.WeakKeyDictionary()
_UNAVAILABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, sa_exc.DisconnectionError,
                sqlite3.OperationalError, sqlite3.InterfaceError)
try:  # the driver's own errors, raised by ``Hot`` statements run on the DBAPI cursor
    import psycopg

    _UNAVAILABLE += (psycopg.OperationalError, psycopg.InterfaceError)
except ImportError:  # pragma: no cover - psycopg is in the serve extra
    pass
_NAMED = re.compile(r"(?<![:\w]):(\w+)")


class StoreUnavailable(SafedlError, RuntimeError):
    """A store's database cannot be reached, is locked or full, or its pool is exhausted: answer 503."""


@dataclass(frozen=True)
class Target:
    """Where one store lives: ``url`` (for SQLAlchemy) and, for SQLite, ``path`` (the file)."""

    url: URL
    path: Path | None
    given: str

    @property
    def is_sqlite(self) -> bool:
        return self.path is not None

    @property
    def display(self) -> str:
        """The file path, or the URL with its password hidden (for messages and logs)."""
        return str(self.path) if self.path is not None else _masked(self.given)


def looks_like_url(value: str | os.PathLike) -> bool:
    """Whether ``value`` is a URL (it contains ``://`` or starts with ``scheme:/``) rather than a file path."""
    text = os.fspath(value)
    return "://" in text or _SCHEME.match(text) is not None


def _masked(text: str) -> str:
    try:
        return make_url(text).render_as_string(hide_password=True)
    except (sa_exc.ArgumentError, ValueError):
        return text


def parse_target(value: str | os.PathLike | Target, *, flag: str) -> Target:
    """``value`` as a Target; anything but a file path or a supported URL raises UserError naming ``flag``."""
    if isinstance(value, Target):
        return value
    text = os.fspath(value)
    if not looks_like_url(text):
        if not text.strip():
            raise UserError(f"{flag} {text!r}: empty; pass {ALLOWED}")
        return Target(url=URL.create("sqlite", database=text), path=Path(text), given=text)
    refused = UserError(f"{flag} {_masked(text)!r}: not a supported database; pass {ALLOWED}")
    if "://" not in text:  # "postgresql:/u@h" is what Path() makes of a URL: refuse it rather than guess
        raise refused
    try:
        url = make_url(text)
    except (sa_exc.ArgumentError, ValueError):
        raise refused from None
    driver = url.drivername.lower()
    if driver == "sqlite":
        if not url.database or url.database == ":memory:" or url.query:
            raise UserError(f"{flag} {text!r}: sqlite:/// needs a file path (sqlite:///keys.db, "
                            f"sqlite:////abs/keys.db) and takes no options; pass {ALLOWED}")
        return Target(url=URL.create("sqlite", database=url.database), path=Path(url.database), given=text)
    if driver in ("postgresql", "postgresql+psycopg"):
        if not url.host:
            raise UserError(f"{flag} {_masked(text)!r}: a PostgreSQL URL needs a host; pass {ALLOWED}")
        return Target(url=url.set(drivername="postgresql+psycopg"), path=None, given=text)
    raise refused


def open_engine(value: str | os.PathLike | Target, *, flag: str, create: bool = False, synchronous: str = "NORMAL",
                pool_size: int = POOL_SIZE, max_overflow: int = MAX_OVERFLOW,
                pool_timeout_s: float = POOL_TIMEOUT_S) -> Engine:
    """The Engine of ``value`` (validated first: UserError, nothing created). ``create``: a SQLite file's folder is
    made if missing (the file itself on first connection). Nothing connects until the engine is used."""
    target = parse_target(value, flag=flag)
    if target.is_sqlite and sqlite3.sqlite_version_info < MIN_SQLITE:
        raise UserError(f"{flag} {target.display}: this Python's SQLite is {sqlite3.sqlite_version}; the stores need "
                        f"{'.'.join(map(str, MIN_SQLITE))} or newer (RETURNING), or a PostgreSQL URL")
    pool = dict(poolclass=sa.pool.QueuePool, pool_size=pool_size, max_overflow=max_overflow,
                pool_timeout=pool_timeout_s)
    if target.is_sqlite:
        if create:
            try:
                target.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"{flag} {target.display}: cannot create its folder ({e})") from None
        engine = sa.create_engine(target.url, connect_args={"check_same_thread": False,
                                                             "timeout": sqlite_settings.BUSY_TIMEOUT_MS / 1000},
                                  **pool)
        sqlite_settings.install(engine, synchronous=synchronous)
    else:
        engine = sa.create_engine(target.url, pool_pre_ping=True, **pool,
                                  connect_args={"connect_timeout": CONNECT_TIMEOUT_S, "application_name": "safedl",
                                                "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"})
    _TARGETS[engine] = target
    return engine


def target_of(engine: Engine) -> Target:
    """The Target an engine of :func:`open_engine` was made for."""
    return _TARGETS[engine]


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


@contextlib.contextmanager
def unavailable_as(what: str) -> Iterator[None]:
    """Turn a database that cannot be reached, is locked or full, or an exhausted pool, into StoreUnavailable."""
    try:
        yield
    except _UNAVAILABLE as e:
        raise StoreUnavailable(f"{what}: {first_line(e)}") from e


def first_line(e: BaseException) -> str:
    """The first line of a database error (the driver's own message when there is one)."""
    orig = getattr(e, "orig", None)
    text = str(orig if orig is not None else e).strip().splitlines()
    return text[0] if text else type(e).__name__


@contextlib.contextmanager
def write(engine: Engine, *, what: str) -> Iterator[Connection]:
    """One write transaction (SQLite: BEGIN IMMEDIATE, the write lock taken up front), committed on success and
    rolled back on error; database failures raise StoreUnavailable."""
    with unavailable_as(what), engine.connect() as conn:
        with conn.begin():
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")  # the driver began none: sqlite.py
            yield conn


def _autocommit(engine: Engine, conn: Connection) -> Connection:
    # PostgreSQL: no BEGIN/COMMIT round trips around one statement. (SQLite connections already run outside a
    # transaction unless ``write`` begins one: sqlite.py; changing their isolation level would undo that.)
    return conn.execution_options(isolation_level="AUTOCOMMIT") if engine.dialect.name == "postgresql" else conn


@contextlib.contextmanager
def read(engine: Engine, *, what: str) -> Iterator[Connection]:
    """A pooled connection for reads, each statement its own snapshot; database failures raise
    StoreUnavailable."""
    with unavailable_as(what), engine.connect() as conn:
        yield _autocommit(engine, conn)


@dataclass(frozen=True)
class HotConnection:
    """A DBAPI connection for ``Hot`` statements and whether it is psycopg's (``%(name)s`` parameters)."""

    dbapi: Any
    postgresql: bool


@contextlib.contextmanager
def hot(engine: Engine, *, what: str, transaction: bool = False) -> Iterator[HotConnection]:
    """A pooled DBAPI connection for the request path's statements (``Hot``), without a SQLAlchemy Connection
    around it (a third of the cost of a lookup): in autocommit (single statements, each atomic by itself), or with
    ``transaction`` one write transaction (SQLite: BEGIN IMMEDIATE), committed at the end and rolled back on error.
    A connection that failed is discarded, not pooled again; database failures raise StoreUnavailable."""
    postgresql = engine.dialect.name == "postgresql"
    with unavailable_as(what):
        raw = engine.raw_connection()
        dbapi = raw.driver_connection
        try:
            if postgresql and not transaction:
                dbapi.autocommit = True
            elif not postgresql and transaction:
                dbapi.execute("BEGIN IMMEDIATE")  # the driver begins none by itself: sqlite.py
            yield HotConnection(dbapi, postgresql)
            if transaction:
                dbapi.commit()
            elif postgresql:
                dbapi.autocommit = False
        except _UNAVAILABLE:
            raw.invalidate()
            raise
        except BaseException:
            if transaction:
                dbapi.rollback()
            if postgresql:
                dbapi.autocommit = False
            raise
        finally:
            raw.close()


def hot_of(conn: Connection) -> HotConnection:
    """The DBAPI connection under a SQLAlchemy Connection (to run ``Hot`` statements in its transaction)."""
    return HotConnection(conn.connection.driver_connection, conn.dialect.name == "postgresql")


class Hot:
    """A statement of the request path run on the DBAPI cursor itself (no SQLAlchemy statement execution, about
    a tenth of the cost): the same SQL on SQLite and PostgreSQL, with ``:name`` parameters (``%(name)s`` for
    psycopg, made once here)."""

    def __init__(self, sql: str):
        self.sql = sql
        self.pyformat = _NAMED.sub(r"%(\1)s", sql.replace("%", "%%"))

    def run(self, conn: HotConnection, params: dict[str, Any]) -> list[tuple]:
        """The rows of the statement (none for a statement that returns none)."""
        cur = conn.dbapi.cursor()
        try:
            cur.execute(self.pyformat if conn.postgresql else self.sql, params)
            return [tuple(r) for r in cur.fetchall()] if cur.description is not None else []
        finally:
            cur.close()

    def run_many(self, conn: HotConnection, rows: list[dict[str, Any]]) -> None:
        """The statement once per row (inside the connection's transaction: ``write`` and ``hot_of``)."""
        cur = conn.dbapi.cursor()
        try:
            cur.executemany(self.pyformat if conn.postgresql else self.sql, rows)
        finally:
            cur.close()


def dispose(engine: Engine | None) -> None:
    """Close the engine's pooled connections (after use; a later use opens new ones)."""
    if engine is not None:
        engine.dispose()


def checkpoint(engine: Engine) -> Any:
    """SQLite: fold the WAL back into the file (graceful shutdown); a no-op elsewhere."""
    if is_sqlite(engine):
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
