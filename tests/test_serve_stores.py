"""The stores on both backends: every test runs against a SQLite file and against a throwaway PostgreSQL cluster
(tests/_postgres.py; skipped without PostgreSQL's binaries, a failure when CI is set). Exact limits across
processes, schema creation from concurrent processes, revision refusal and upgrade, bad values, pool exhaustion."""
from __future__ import annotations

import multiprocessing as mp
import shutil
import time

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from safedl.cli import app as cli
from safedl.errors import UserError
from safedl.serve.audit import AuditStore, AuditUnavailable, read_rows
from safedl.serve.keys import KeyStore
from safedl.serve.limits import RateLimiter
from safedl.serve.monitor.store import AlertStore, KeyActions, KeyBlocked
from safedl.serve.stores import engine as engines
from safedl.serve.stores import migrate
from safedl.serve.stores.schema import AUDIT_TABLES, metadata
from safedl.serve.swap import record_swap

FORK = mp.get_context("fork")  # children inherit the imports (seconds saved per process); each opens its own engine


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """A function name -> PATH_OR_URL of an empty database (SQLite: one file per name; PostgreSQL: one new
    database per test, shared by the names, as replicas would share it)."""
    if request.param == "sqlite":
        return lambda name="store": str(tmp_path / f"{name}.db")
    url = request.getfixturevalue("pg_cluster").database()
    return lambda name="store": url


class Clock:
    def __init__(self, t=1_700_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


# -- limits --------------------------------------------------------------------------------------------------------
def test_token_bucket_quota_and_pixels(db):
    store = KeyStore(db("keys"), create=True)
    key, _ = store.create(name="a", rate_per_s=2.0, burst=3, daily_quota=5)
    clock = Clock(1_700_006_400.0 - 10)  # 10 s before a UTC midnight
    lim = RateLimiter(store, clock=clock)
    assert [lim.take(key).allowed for _ in range(4)] == [True, True, True, False]
    v = lim.take(key)
    assert v.kind == "rate" and v.retry_after_s == 1
    clock.t += 0.5  # 2/s refills one token in 0.5 s
    assert lim.take(key).allowed and not lim.take(key).allowed
    clock.t += 100 * 0  # (midnight is 9.5 s away)
    assert lim.charge_images(key, images=4).allowed and not lim.charge_images(key, images=2).allowed
    assert lim.charge_images(key, images=1).allowed and not lim.charge_images(key, images=1).allowed
    clock.t += 5
    v = lim.take(key)
    assert not v.allowed and v.kind == "quota" and v.retry_after_s == 5
    clock.t += 5  # a new UTC day: the quota resets, the bucket is full again (capped at the burst)
    assert sum(lim.take(key).allowed for _ in range(10)) == 3 and lim.charge_images(key, images=5).allowed
    assert lim.charge_pixels(key, pixels=60, rate_per_s=10.0, burst=100).allowed
    v = lim.charge_pixels(key, pixels=60, rate_per_s=10.0, burst=100)
    assert not v.allowed and v.kind == "pixels" and v.retry_after_s == 2  # 40 left, 20 more take 2 s
    clock.t += 2
    assert lim.charge_pixels(key, pixels=60, rate_per_s=10.0, burst=100).allowed
    store.close()


def _spend(url: str, names: tuple[str, str], go: float, out) -> None:
    store = KeyStore(url)
    keys = {k.name: k for k in store.list()}
    lim = RateLimiter(store)
    while time.time() < go:
        time.sleep(0.001)
    took = sum(lim.take(keys[names[0]]).allowed for _ in range(5))
    charged = sum(lim.charge_images(keys[names[1]], images=1).allowed for _ in range(5))
    out.put((took, charged))
    store.close()


def test_limits_are_exact_across_processes(db):
    """4 processes at once: 20 take() on a burst-5 key give exactly 5; 20 one-image charges on a quota-7 key,
    exactly 7 (one atomic statement each: no read-then-write race)."""
    url = db("keys")
    store = KeyStore(url, create=True)
    store.create(name="burst5", rate_per_s=1e-6, burst=5)
    store.create(name="quota7", rate_per_s=1000, burst=1000, daily_quota=7)
    store.close()
    out = FORK.Queue()
    go = time.time() + 1.5
    procs = [FORK.Process(target=_spend, args=(url, ("burst5", "quota7"), go, out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    assert sum(r[0] for r in results) == 5 and sum(r[1] for r in results) == 7, results


# -- schema --------------------------------------------------------------------------------------------------------
def _open_both(url: str, barrier, out) -> None:
    barrier.wait(30)
    try:
        KeyStore(url, create=True).close()
        a = AuditStore(url)
        a.close()
        out.put("ok" if a.last_error is None else a.last_error)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        out.put(f"{type(exc).__name__}: {exc}")


def _revisions(url: str) -> list:
    eng = engines.open_engine(url, flag="--db")
    with eng.connect() as conn:
        rows = conn.execute(sa.text("SELECT version_num FROM alembic_version")).all()
        tables = set(sa.inspect(conn).get_table_names())
    eng.dispose()
    return [r[0] for r in rows], tables


def test_schema_is_created_once_by_concurrent_starts(db):
    url = db("shared")
    barrier, out = FORK.Barrier(4), FORK.Queue()
    procs = [FORK.Process(target=_open_both, args=(url, barrier, out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert results == ["ok"] * 4
    revs, tables = _revisions(url)
    assert revs == [migrate.head()] and set(metadata.tables) <= tables


def test_schema_matches_the_migrations(db):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    store = KeyStore(db("keys"), create=True)
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    store.close()
    assert diff == []


NEXT = '''"""test: a later revision"""
import sqlalchemy as sa
from alembic import op

revision = "9999"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("audit", sa.Column("note", sa.Text(), nullable=True))


def downgrade():
    op.drop_column("audit", "note")
'''


def test_older_schema_is_refused_and_db_upgrade_keeps_rows(db, tmp_path, monkeypatch):
    url = db("audit")
    audit = AuditStore(url)
    audit.start()
    audit.submit([{"ts": 1.0, "request_id": f"r{i}", "http_status": 200} for i in range(3)]).result(10)
    audit.close()
    later = tmp_path / "migrations"  # this safedl's migrations plus one more: the database is now one behind
    shutil.copytree(migrate.SCRIPT_LOCATION, later, ignore=shutil.ignore_patterns("__pycache__"))
    head = migrate.head()
    (later / "versions" / "9999_next.py").write_text(NEXT.format(head=head))
    monkeypatch.setattr(migrate, "SCRIPT_LOCATION", later)
    for opener in (AuditStore, KeyStore):
        with pytest.raises(UserError, match=f"revision {head}; this safedl needs revision 9999") as err:
            opener(url)
        assert f"safedl db upgrade {engines.parse_target(url, flag='x').display}" in str(err.value)
    res = CliRunner().invoke(cli, ["db", "upgrade", url])
    assert res.exit_code == 0 and f"revision 9999 (was {head})" in res.output, res.output
    assert [r["request_id"] for r in read_rows(url)] == ["r0", "r1", "r2"]
    assert _revisions(url)[0] == ["9999"]
    AuditStore(url).close()  # opens now
    assert CliRunner().invoke(cli, ["db", "upgrade", url]).exit_code == 0  # again: nothing to do


LEGACY = """
CREATE TABLE api_keys (key_id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, secret_sha256 TEXT NOT NULL,
    tier TEXT NOT NULL, scopes TEXT NOT NULL, rate_per_s REAL NOT NULL, burst INTEGER NOT NULL,
    daily_quota INTEGER NOT NULL, created_at REAL NOT NULL, revoked_at REAL);
CREATE TABLE rate_state (key_id TEXT PRIMARY KEY, tokens REAL NOT NULL, updated_at REAL NOT NULL, day TEXT NOT NULL,
    used INTEGER NOT NULL);
INSERT INTO api_keys VALUES ('0123456789ab', 'old', 'x', 'label', 'predict', 1.0, 2, 3, 4.0, NULL);
"""


def test_a_file_from_before_revisions_is_refused_then_adopted(tmp_path):
    import sqlite3

    path = tmp_path / "keys.db"
    conn = sqlite3.connect(path)
    conn.executescript(LEGACY)
    conn.close()
    with pytest.raises(UserError, match=f"no schema revision.*safedl db upgrade {path}"):
        KeyStore(path)
    res = CliRunner().invoke(cli, ["db", "upgrade", str(path)])
    assert res.exit_code == 0 and "(was unversioned)" in res.output, res.output
    store = KeyStore(path)
    assert [k.name for k in store.list()] == ["old"]
    assert RateLimiter(store).take(store.list()[0]).allowed
    KeyActions(store).record(key_id="0123456789ab", action="block", reason="t", alert_id=None)  # a new table
    store.close()


def test_bad_values_exit_2_and_create_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bundle").mkdir()
    for args in (["--keys", "mysql://u@h/k"], ["--keys", "k.db", "--audit", "postgres://u:pw@h/a"]):
        res = CliRunner().invoke(cli, ["serve", "bundle", *args])
        assert res.exit_code == 2 and "not a supported database" in res.output and "pw" not in res.output, res.output
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


# -- pools and outages ---------------------------------------------------------------------------------------------
def test_an_exhausted_pool_raises_fast(db):
    store = KeyStore(db("keys"), create=True)
    key, token = store.create(name="a")
    held = [store.engine.connect() for _ in range(engines.POOL_SIZE + engines.MAX_OVERFLOW)]
    t0 = time.monotonic()
    with pytest.raises(engines.StoreUnavailable):
        RateLimiter(store).take(key)
    assert time.monotonic() - t0 < engines.POOL_TIMEOUT_S + 2
    for c in held:
        c.close()
    assert store.authenticate(token) == key  # connections back: it works again
    store.close()


# -- audit, swaps, alerts, key actions -----------------------------------------------------------------------------
def test_audit_rows_unauthenticated_counts_swaps_and_export(db, tmp_path):
    url = db("audit")
    audit = AuditStore(url)
    audit.start()
    audit.submit([{"ts": 1.0, "request_id": "a", "http_status": 200, "detector_scores": {"d": 0.5},
                   "rejected": True}]).result(10)
    assert audit.try_commit_inline([{"ts": 2.0, "request_id": "b", "http_status": 401}])
    rows = [{"minute": 5, "client": "1.2.3.4", "endpoint": "/v1/predict", "code": "unauthorized", "count": 2}] * 2
    assert audit.record_unauthenticated(rows) == 1 and audit.record_unauthenticated(rows[:1]) == 1
    record_swap(audit.engine, {"ts": 3.0, "trigger": "http", "action": "swap", "outcome": "refused"})
    audit.close()
    got = list(read_rows(url))
    assert [(r["request_id"], r["rejected"], r["detector_scores"]) for r in got] == [
        ("a", 1, '{"d":0.5}'), ("b", None, None)]
    assert [r["request_id"] for r in read_rows(url, since=1.5)] == ["b"]
    res = CliRunner().invoke(cli, ["audit", "export", "--db", url, "--out", str(tmp_path / "x.jsonl")])
    assert res.exit_code == 0 and "wrote 2 rows" in res.output, res.output
    eng = engines.open_engine(url, flag="--db")
    with eng.connect() as conn:
        assert conn.execute(sa.text("SELECT SUM(count) FROM unauthenticated")).scalar() == 6
        assert conn.execute(sa.text("SELECT outcome FROM bundle_swaps")).scalar() == "refused"
    eng.dispose()


def test_audit_size_cap_refuses_and_keeps_every_acknowledged_row(db):
    url = db("audit")
    audit = AuditStore(url, max_bytes=256 * 1024)
    audit.start()
    acked = 0
    with pytest.raises(AuditUnavailable):
        for i in range(2000):
            audit.submit([{"ts": float(i), "request_id": f"r{i}", "http_status": 200, "reason": "x" * 1000}]).result(10)
            acked += 1
    assert 50 < acked < 1000 and not audit.healthy
    assert audit.record_unauthenticated([{"minute": 1, "client": "c", "endpoint": "e", "code": "u", "count": 1}]) == 0
    audit.close()
    assert len(list(read_rows(url))) == acked


def test_a_group_that_would_pass_the_audit_cap_is_refused_whole(db):
    """One group commit of about 200 KB into a cap 64 KB above the empty tables: refused, none of its rows kept
    (PostgreSQL checked the size only before the group: it was committed, 3x past the cap)."""
    url = db("audit")
    AuditStore(url).close()  # the empty schema
    empty = 0
    if engines.looks_like_url(url):
        eng = engines.open_engine(url, flag="--audit")
        with eng.connect() as conn:
            empty = conn.execute(sa.text("SELECT SUM(pg_total_relation_size(to_regclass(t))) FROM "
                                         "unnest(CAST(:t AS text[])) AS t"), {"t": list(AUDIT_TABLES)}).scalar()
        eng.dispose()
    audit = AuditStore(url, max_bytes=int(empty) + 64 * 1024)
    audit.start()
    rows = [{"ts": float(i), "request_id": f"r{i}", "http_status": 200, "reason": "x" * 1000} for i in range(200)]
    with pytest.raises(AuditUnavailable):
        audit.submit(rows).result(10)
    audit.close()
    assert list(read_rows(url)) == []


def test_alerts_and_key_actions(db):
    keys = KeyStore(db("keys"), create=True)
    key, _ = keys.create(name="k", rate_per_s=10, burst=10)
    acts = KeyActions(keys)
    acts.record(key_id=key.key_id, action="throttle", reason="volume", alert_id="a1", params={"factor": 0.5})
    assert acts.enforce(key).burst == 5
    acts.record(key_id=key.key_id, action="block", reason="extraction", alert_id="a2")
    with pytest.raises(KeyBlocked):
        acts.enforce(key)
    assert [a.action for a in acts.restore("k", action="block")] == ["block"]
    assert acts.enforce(key).rate_per_s == 5 and len(acts.history()) == 2
    alerts = AlertStore(db("audit"))
    alert = {"alert_id": "a1", "rule": "r", "severity": "high", "key_id": key.key_id, "state": "firing",
             "started_at": 10.0, "last_at": 10.0, "value": 1.0, "events": 1, "metric": "m", "threshold": 0.5}
    alerts.upsert(alert)
    alerts.upsert({**alert, "events": 3, "last_at": 12.0})
    assert [(a["alert_id"], a["events"]) for a in alerts.recent(since=0.0)] == [("a1", 3)]
    assert alerts.resolve_stale(now=20.0) == 1 and alerts.recent(since=30.0) == []
    alerts.close()
    keys.close()
