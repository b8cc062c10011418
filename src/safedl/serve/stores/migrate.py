"""The schema's life cycle: created on an empty database (under a lock, so concurrent starts are safe), checked on
every open (an older or unknown revision is refused with what to do), upgraded by ``safedl db upgrade``.

The lock: on PostgreSQL a transaction-scoped advisory lock (``pg_advisory_xact_lock``), on SQLite the write lock of
a ``BEGIN IMMEDIATE`` transaction; the check, the creation and the recorded Alembic revision (table
``alembic_version``) all happen inside that one transaction. The migrations are shipped in the package
(serve/stores/migrations); they run only through this module."""
from __future__ import annotations

import logging
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Connection, Engine

from safedl.errors import UserError
from safedl.serve.stores import engine as engines
from safedl.serve.stores.schema import TABLES

log = logging.getLogger("safedl.serve.stores")
logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines per migration step; ours says what ran
SCRIPT_LOCATION = Path(__file__).with_name("migrations")
LOCK_KEY = 0x5AFED1_0001  # the advisory lock of safedl's schema (any one bigint, the same in every process)


def _config(conn: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    cfg.attributes["connection"] = conn
    return cfg


def head() -> str:
    """The revision this safedl's stores are written for."""
    return ScriptDirectory.from_config(_config()).get_current_head()


def _known(revision: str) -> bool:
    try:
        return ScriptDirectory.from_config(_config()).get_revision(revision) is not None
    except CommandError:
        return False


def current(conn: Connection) -> str | None:
    """The revision recorded in the database (None: none recorded). Read directly (Alembic's MigrationContext
    would log two lines on every store opened)."""
    if not sa.inspect(conn).has_table("alembic_version"):
        return None
    rows = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
    if len(rows) > 1:
        raise UserError(f"{engines.target_of(conn.engine).display}: several schema revisions recorded "
                        f"({', '.join(rows)}); this safedl keeps one")
    return rows[0] if rows else None


def _lock(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
    # SQLite: the connection's BEGIN IMMEDIATE (engines.write) already holds the write lock


def _ours(conn: Connection) -> set[str]:
    return set(sa.inspect(conn).get_table_names()) & set(TABLES)


def _refusal(display: str, revision: str | None) -> UserError:
    if revision is not None and not _known(revision):
        return UserError(f"{display}: its schema revision {revision!r} is unknown to this safedl (written by a "
                         f"newer version?); run that version, or a newer safedl")
    had = (f"is at revision {revision}" if revision is not None
           else "has no schema revision (it was written by a safedl from before revisions)")
    return UserError(f"{display}: its schema {had}; this safedl needs revision {head()}. Back it up, then run "
                     f"`safedl db upgrade {display}`")


def ensure_schema(engine: Engine, *, what: str) -> None:
    """Make sure ``engine``'s database holds this safedl's schema: created when the database has none of its
    tables; UserError when it holds an older or unknown revision (nothing changed); StoreUnavailable when the
    database cannot be reached."""
    want = head()
    with engines.read(engine, what=what) as conn:
        if current(conn) == want:
            return
    display = engines.target_of(engine).display
    with engines.write(engine, what=what) as conn:
        _lock(conn)
        revision = current(conn)
        if revision == want:
            return
        if revision is None and not _ours(conn):
            command.upgrade(_config(conn), "head")
            log.info("created the schema (revision %s) in %s", want, display,
                     extra={"event": "schema_created", "revision": want})
            return
        raise _refusal(display, revision)


def upgrade(engine: Engine, *, what: str) -> tuple[str | None, str]:
    """Bring ``engine``'s database to this safedl's revision (rows kept; a database written by a safedl from
    before revisions is adopted); returns (revision before, revision after)."""
    want = head()
    with engines.write(engine, what=what) as conn:
        _lock(conn)
        before = current(conn)
        if before is not None and not _known(before):
            raise _refusal(engines.target_of(engine).display, before)
        if before != want:
            command.upgrade(_config(conn), "head")
    return before, want
