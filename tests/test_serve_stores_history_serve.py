"""The service's stateful detector with its per-key history shared through the audit database (SQLite file or
PostgreSQL): an attacker sending a near-duplicate stream round-robin to two replicas is flagged at the query number
one replica flags it at; with ``history_store: memory`` (each process its own history, as before) neither replica
has flagged it by then."""
from __future__ import annotations

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from _monitor_helpers import near_duplicates, npy, write_config  # noqa: E402
from _serve_helpers import make_bundle  # noqa: E402
from safedl.cli import app as cli_app  # noqa: E402
from safedl.deploy import load_bundle  # noqa: E402
from safedl.serve import create_app  # noqa: E402
from safedl.serve.audit import AuditStore  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402
from safedl.serve.monitor import load_monitor_config  # noqa: E402
from safedl.serve.monitor.calibration import quantize  # noqa: E402
from safedl.serve.stores import engine as engines  # noqa: E402
from safedl.serve.stores.history import history_location  # noqa: E402

RULE = {"name": "query_attack", "metric": "stateful_flags", "scope": "key", "window": {"count": 50},
        "threshold": 1, "severity": "critical"}


@pytest.fixture(scope="module")
def bundle_dir(tiny_model, digits_splits, tmp_path_factory):
    return make_bundle(tiny_model, digits_splits, tmp_path_factory.mktemp("history") / "bundle", detect=False)


@pytest.fixture(scope="module")
def calibration(bundle_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib") / "calibration.json"
    res = CliRunner().invoke(cli_app, ["monitor", "calibrate", str(bundle_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(params=["sqlite", "postgresql"])
def dbs(request, tmp_path):
    """(keys, audit) PATH_OR_URL: two SQLite files of one host, or one PostgreSQL database for both."""
    if request.param == "sqlite":
        return str(tmp_path / "keys.db"), str(tmp_path / "audit.db")
    url = request.getfixturevalue("pg_cluster").database()
    return url, url


def replicas(tmp_path, bundle_dir, calibration, dbs, *, n: int, store: str) -> list:
    """``n`` in-process replicas of the service on the databases ``dbs``, each with its own monitor."""
    cfg = load_monitor_config(write_config(tmp_path / f"monitor-{store}.yml", calibration=calibration,
                                           rules=[RULE], detectors={"stateful": {"history_store": store}}))
    return [TestClient(create_app(bundle=load_bundle(bundle_dir), keys=KeyStore(dbs[0]), audit=AuditStore(dbs[1]),
                                  monitor_config=cfg)).__enter__() for _ in range(n)]


def send(clients: list, name: str, token: str, x) -> list[int | None]:
    """Each image as one request, round-robin over ``clients`` (each monitor done with it before the next goes
    out); then each replica's query number of the key's first stateful flag (None: not flagged)."""
    for i in range(len(x)):
        c = clients[i % len(clients)]
        r = c.post("/v1/predict", content=npy(x[i:i + 1]),
                   headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-npy"})
        assert r.status_code == 200, r.text
        assert c.app.state.service.monitor.flush()
    out = []
    for c in clients:
        keys = c.app.state.service.monitor.snapshot()["keys"]
        out.append(next((k["flags"]["stateful"] for k in keys if k["name"] == name), None))
    return out


def test_an_attack_spread_over_two_replicas_is_flagged_as_on_one(tmp_path, bundle_dir, calibration, dbs,
                                                                  digits_splits):
    x = near_duplicates(quantize(digits_splits.test.x[0]), 80, eps=0.1, seed=0)
    found: dict[str, list] = {}
    for name, n, store in (("one", 1, "memory"), ("two_shared", 2, "database"), ("two_memory", 2, "memory")):
        keys = KeyStore(dbs[0], create=True)
        _, token = keys.create(name=f"attacker-{name}", tier="full", rate_per_s=1e4, burst=10_000)
        keys.close()
        clients = replicas(tmp_path, bundle_dir, calibration, dbs, n=n, store=store)
        try:  # a key of its own per configuration: no shared history carried over
            sent = x if name == "one" else x[:found["one"][0]]  # spread: only as many queries as one needed
            found[name] = send(clients, f"attacker-{name}", token, sent)
        finally:
            for c in clients:
                c.__exit__(None, None, None)
    one = found["one"][0]
    assert one is not None and 50 < one <= 60  # k = 50 neighbours needed before the first judgement
    assert min(f for f in found["two_shared"] if f is not None) == one, found  # the same query of the key
    assert found["two_memory"] == [None, None], found  # each replica saw half of the key's queries
    written = sa.text("SELECT COALESCE(SUM(n), 0) FROM query_history")
    for where, expect in ((history_location(dbs[1]), one), (dbs[1], one if engines.looks_like_url(dbs[1]) else 0)):
        eng = engines.open_engine(where, flag="--audit")  # SQLite: the history has a file of its own
        with eng.connect() as conn:
            assert conn.execute(written).scalar() == expect, where  # only the shared configuration wrote
        eng.dispose()


@pytest.mark.parametrize("layout", ["sqlite_two_workers", "postgresql_two_replicas"])
def test_real_processes_flag_a_spread_attack_within_the_one_replica_range(layout, tmp_path, bundle_dir, calibration,
                                                                         digits_splits, request):
    """`safedl serve --workers 2` on SQLite files, or two `safedl serve` replicas on one PostgreSQL database: 64
    near-duplicate queries, one a request, each on a new connection (spread over the workers by the kernel, or
    alternating replicas). One replica flags this stream within its first 60 queries (as the test above; k = 50); with
    per-process histories no process could (none holds 50 of them when split evenly); shared, a process does."""
    import time

    import httpx

    from _serve_helpers import ServerProcess

    if layout.startswith("sqlite"):
        keys_db, audit_db, extra, n = tmp_path / "keys.db", tmp_path / "audit.db", ("--workers", "2"), 1
    else:
        keys_db = audit_db = request.getfixturevalue("pg_cluster").database()
        extra, n = (), 2
    keys = KeyStore(keys_db, create=True)
    _, token = keys.create(name="attacker", tier="full", rate_per_s=1e4, burst=10_000)
    _, ops = keys.create(name="ops", scopes=("admin",))
    keys.close()
    cfg = write_config(tmp_path / "monitor.yml", calibration=calibration, rules=[RULE],
                       detectors={"stateful": {"history_store": "database"}})
    x = near_duplicates(quantize(digits_splits.test.x[0]), 64, eps=0.1, seed=0)
    servers = [ServerProcess(bundle_dir, keys_db, audit_db, "--monitor-config", str(cfg), *extra) for _ in range(n)]
    try:
        for s in servers:
            s.wait_ready()
        for i in range(len(x)):
            r = httpx.post(servers[i % n].url + "/v1/predict", content=npy(x[i:i + 1]), timeout=30,
                           headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-npy"})
            assert r.status_code == 200, r.text
        flags, deadline = [], time.monotonic() + 30
        while time.monotonic() < deadline and not any(flags):
            for s in servers:  # (each answer is from the worker that took the connection: its own summary)
                keys_seen = httpx.get(s.url + "/v1/monitor/summary", timeout=30,
                                      headers={"Authorization": f"Bearer {ops}"}).json()["keys"]
                flags += [k["flags"]["stateful"] for k in keys_seen if k["name"] == "attacker"]
            time.sleep(0.2)
    finally:
        for s in servers:
            s.__exit__(None, None, None)
    first = min(f for f in flags if f is not None)
    assert 50 < first <= 60, flags
