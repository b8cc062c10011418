"""Audit retention (``--audit-retention-days``): expired rows leave every audit table in bounded batches run by the
writer thread, a firing alert stays, and a purge running under concurrent inserts never loses an acknowledged row
(SQLite and PostgreSQL: tests/_postgres.py)."""
from __future__ import annotations

import inspect
import threading
import time

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from safedl.cli import app as cli
from safedl.errors import UserError
from safedl.serve.audit import AuditStore, read_rows
from safedl.serve.monitor.store import AlertStore
from safedl.serve.stores import engine as engines
from safedl.serve.stores.retention import DAY_S, Retention
from safedl.serve.swap import record_swap


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "audit.db")
    return request.getfixturevalue("pg_cluster").database()


def _count(url: str, table: str) -> int:
    eng = engines.open_engine(url, flag="--db")
    with eng.connect() as conn:
        n = conn.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar()
    eng.dispose()
    return int(n)


def _alert(alert_id: str, *, state: str, started: float, resolved: float | None) -> dict:
    return {"alert_id": alert_id, "rule": "r", "severity": "high", "key_id": "k", "state": state,
            "started_at": started, "resolved_at": resolved, "last_at": resolved or started, "value": 1.0,
            "events": 1, "metric": "m", "threshold": 0.5}


def test_purge_deletes_expired_rows_of_every_table_and_keeps_the_rest(url):
    now = 1_800_000_000.0
    old, recent = now - 31 * DAY_S, now - 29 * DAY_S
    audit = AuditStore(url, retention=Retention(days=30, batch=3), clock=lambda: now)
    audit.start()
    audit.submit([{"ts": old + i, "request_id": f"old{i}", "http_status": 200} for i in range(5)]
                 + [{"ts": recent, "request_id": "new", "http_status": 200}]).result(10)
    audit.record_unauthenticated([{"minute": int(old // 60), "client": "c", "endpoint": "e", "code": "u", "count": 1},
                                  {"minute": int(recent // 60), "client": "c", "endpoint": "e", "code": "u",
                                   "count": 1}])
    record_swap(audit.engine, {"ts": old, "trigger": "http", "action": "swap", "outcome": "refused"})
    record_swap(audit.engine, {"ts": recent, "trigger": "http", "action": "swap", "outcome": "ok"})
    alerts = AlertStore(url)
    alerts.upsert(_alert("resolved-old", state="resolved", started=old, resolved=old + 60))
    alerts.upsert(_alert("firing-old", state="firing", started=old, resolved=None))
    alerts.upsert(_alert("resolved-new", state="resolved", started=recent, resolved=recent + 60))
    first = audit.purge_expired()
    assert first["audit"] == 3  # one bounded batch
    audit.purge_expired()
    assert audit.purge_expired()["audit"] == 0
    audit.close()
    assert [r["request_id"] for r in read_rows(url)] == ["new"]
    assert audit.purged["audit"] == 5 and audit.purged["bundle_swaps"] == 1
    assert _count(url, "unauthenticated") == 1 and _count(url, "bundle_swaps") == 1
    assert sorted(a["alert_id"] for a in alerts.recent(since=0.0)) == ["firing-old", "resolved-new"]


def test_writer_purges_under_concurrent_inserts_without_losing_an_acknowledged_row(url):
    """4 threads insert 150 fresh rows each while the writer purges 3,000 expired ones in batches of 100 between
    group commits: every acknowledged fresh row is there, no expired one is."""
    audit = AuditStore(url)
    audit.start()
    stale = time.time() - 3 * DAY_S
    for b in range(3):
        audit.submit([{"ts": stale, "request_id": f"s{b}-{i}", "http_status": 200} for i in range(1000)]).result(30)
    audit.close()
    audit = AuditStore(url, retention=Retention(days=1, interval_s=0.05, batch=100))
    audit.start()
    acked: list[str] = []
    lock = threading.Lock()

    def insert(t: int) -> None:
        for i in range(150):
            rid = f"t{t}-{i}"
            audit.submit([{"ts": time.time(), "request_id": rid, "http_status": 200}]).result(30)
            with lock:
                acked.append(rid)

    threads = [threading.Thread(target=insert, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    deadline = time.monotonic() + 60
    while audit.purged.get("audit", 0) < 3000 and time.monotonic() < deadline:
        time.sleep(0.05)
    audit.close()
    ids = [r["request_id"] for r in read_rows(url)]
    assert audit.purged["audit"] == 3000
    assert sorted(ids) == sorted(acked) and len(acked) == 600


@pytest.mark.parametrize("days", [0, -1, 0.5, 4000, float("nan")])
def test_retention_days_out_of_range_is_one_clear_error(days):
    with pytest.raises(UserError, match="--audit-retention-days"):
        Retention(days=days)


def test_serve_flag_refuses_a_bad_value_with_exit_2_and_accepts_30(tmp_path):
    res = CliRunner().invoke(cli, ["serve", str(tmp_path / "b"), "--keys", str(tmp_path / "k.db"),
                                   "--audit-retention-days", "0"])
    assert res.exit_code == 2 and "--audit-retention-days 0" in res.output and "1 to 3650" in res.output, res.output
    from safedl.serve.cli import serve_command
    from safedl.serve.options import options_from_flags

    flags = {n: p.default.default for n, p in inspect.signature(serve_command).parameters.items()}
    flags.update(bundle=tmp_path / "b", keys=str(tmp_path / "k.db"), audit_retention_days=30.0)
    assert options_from_flags(**flags).audit_retention == Retention(days=30.0)


def test_safedl_serve_purges_at_start_and_keeps_what_it_answers(tiny_model, digits_splits, tmp_path):
    """The real server with --audit-retention-days 1: a 2-day-old row is gone once it is ready, the rows of the
    requests it answers stay."""
    import httpx

    from _serve_helpers import ServerProcess, make_bundle, png_bytes
    from safedl.serve.keys import KeyStore

    bundle = make_bundle(tiny_model, digits_splits, tmp_path / "b")
    keys = KeyStore(tmp_path / "k.db", create=True)
    token = keys.create(name="u", rate_per_s=100, burst=100)[1]
    keys.close()
    audit_db = tmp_path / "audit.db"
    old = AuditStore(audit_db)
    old.start()
    old.submit([{"ts": time.time() - 2 * DAY_S, "request_id": "stale", "http_status": 200}]).result(10)
    old.close()
    with ServerProcess(bundle, tmp_path / "k.db", audit_db, "--audit-retention-days", "1") as srv:
        srv.wait_ready()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(r["request_id"] == "stale" for r in read_rows(audit_db)):
            time.sleep(0.2)
        img = png_bytes(digits_splits.test.x[0])
        for _ in range(2):
            r = httpx.post(srv.url + "/v1/predict", files={"file": ("x.png", img, "image/png")},
                           headers={"Authorization": f"Bearer {token}"}, timeout=30)
            assert r.status_code == 200, r.text
        srv.stop()  # graceful: the audit is flushed
    ids = [r["request_id"] for r in read_rows(audit_db)]
    assert "stale" not in ids and len([r for r in read_rows(audit_db) if r["endpoint"] == "/v1/predict"]) == 2
