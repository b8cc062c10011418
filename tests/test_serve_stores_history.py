"""The stateful detector's shared per-key history (serve/stores/history.py) on SQLite and PostgreSQL: a Square
attack's query stream spread round-robin over two replicas is flagged at the same query number as on one replica
(with per-process history, today's default before this store, it is flagged later); a replica that joins late
judges the key's last ``history`` queries; the table stays bounded per key; an unavailable database leaves the
detector judging on its own queries; schema revision 0001 upgrades without losing audit rows."""
from __future__ import annotations

import multiprocessing as mp
import sqlite3

import pytest
import torch
from alembic import command
from alembic.config import Config
from typer.testing import CliRunner

from safedl import registry
from safedl.cli import app as cli
from safedl.defenses.query import StatefulDetector
from safedl.defenses.query.history import SharedHistory
from safedl.errors import ConfigError, UserError
from safedl.serve.audit import AuditStore, read_rows
from safedl.serve.stores import engine as engines
from safedl.serve.stores import migrate
from safedl.serve.stores.history import DatabaseHistory, decode

FORK = mp.get_context("fork")
CHUNK = 16  # queries per observed batch (the monitor sees one predict request's images at a time)
K, HISTORY = 20, 200


@pytest.fixture(scope="module")
def threshold(digits_splits):
    return StatefulDetector(k=K, history=HISTORY).calibrate([digits_splits.train.x], fpr=1e-3).threshold_


@pytest.fixture(scope="module")
def attack_stream(tiny_model, digits_splits):
    """Benign test images in order, then what a Square attack (seed 0) on three images sends: one fixed stream."""
    sent = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            sent.append(x.detach().clone())
            return tiny_model(x)

    square = registry.create("evasion", "square", eps=0.05, max_queries=100, seed=0)
    for i in range(3):
        square(Recorder(), digits_splits.test.x[i:i + 1], digits_splits.test.y[i:i + 1])
    return torch.cat([digits_splits.test.x[10:250], *sent])


def first_flag(replicas: list[StatefulDetector], stream: torch.Tensor, key: str = "attacker") -> int | None:
    """The stream's 1-based number of the first flagged query, batches of CHUNK sent round-robin to ``replicas``."""
    for b, i in enumerate(range(0, len(stream), CHUNK)):
        batch = stream[i:i + CHUNK]
        v = replicas[b % len(replicas)].observe(key, batch)
        if v.flagged:
            return i + v.first_at - (v.n_seen - len(batch))  # position in the stream, whatever the detector counts
    return None


def test_a_spread_attack_is_flagged_as_on_one_replica(db_url, threshold, attack_stream):
    one = first_flag([StatefulDetector(k=K, history=HISTORY, threshold=threshold)], attack_stream)
    assert one is not None and one > 240  # flagged in the attack, not in the benign prefix
    apart = first_flag([StatefulDetector(k=K, history=HISTORY, threshold=threshold) for _ in range(2)],
                       attack_stream)
    assert apart is None or apart > one  # per-process history: each replica sees half the attack
    stores = [DatabaseHistory(db_url) for _ in range(2)]  # two replicas: own engines, own writer ids
    replicas = [StatefulDetector(k=K, history=HISTORY, threshold=threshold, shared=s) for s in stores]
    shared = first_flag(replicas, attack_stream)
    assert shared == one, (shared, one, apart)
    print(f"first flag: one replica {one}, two apart {apart}, two shared {shared}")
    v = replicas[0].observe("attacker", attack_stream[:1])
    assert v.n_seen == -(-shared // CHUNK) * CHUNK + 1  # counted over both replicas: the batches sent so far
    for s in stores:
        s.close()


def test_a_late_replica_judges_the_keys_last_window(db_url, threshold, digits_splits):
    dup = digits_splits.test.x[:1].expand(2 * K, -1, -1, -1)  # 2k identical queries: an obvious attack
    early = StatefulDetector(k=K, history=HISTORY, threshold=threshold, shared=DatabaseHistory(db_url))
    early.observe("a", dup)
    alone = StatefulDetector(k=K, history=HISTORY, threshold=threshold)
    assert not alone.observe("a", dup[:CHUNK]).flagged  # fewer than k queries of its own: not judged
    late = StatefulDetector(k=K, history=HISTORY, threshold=threshold, shared=DatabaseHistory(db_url))
    v = late.observe("a", dup[:CHUNK])
    assert v.flagged and v.first_at == 2 * K + 1 and v.n_seen == 2 * K + CHUNK
    assert not late.observe("b", dup[:CHUNK]).flagged  # another key's history is not this one's


def test_the_shared_history_is_bounded_per_key(db_url, digits_splits):
    store = DatabaseHistory(db_url)
    det = StatefulDetector(k=2, history=50, threshold=1e-9, shared=store)
    x = digits_splits.test.x[:300]
    for i in range(0, 300, 10):
        det.observe("a", x[i:i + 10])
    with engines.read(store.engine, what="test") as conn:
        n, size = conn.exec_driver_sql("SELECT SUM(n), SUM(LENGTH(feats)) FROM query_history").one()
    assert 50 <= n <= 2 * 50 + 10 and size == n * 64 * 2  # the key's last window and at most one more; float16
    other = DatabaseHistory(db_url).exchange(detector="stateful", key="a", feats=x[:1].flatten(1), since=None,
                                             window=50)
    assert other.n_before == 300 and len(other.earlier) == 50 and other.lost == 0
    expect = x[250:300].flatten(1).half().float()
    assert torch.equal(other.earlier, expect)  # the last 50 queries, in order, as float16
    store.forget(detector="stateful", key="a")
    again = DatabaseHistory(db_url).exchange(detector="stateful", key="a", feats=x[:1].flatten(1), since=None,
                                             window=50)
    assert again.n_before == 0 and len(again.earlier) == 0


def test_an_unavailable_database_leaves_the_detector_judging_alone(tmp_path, digits_splits, caplog):
    store = DatabaseHistory(tmp_path / "audit.db")
    store.engine = engines.open_engine("postgresql://nobody@127.0.0.1:1/none", flag="--audit", pool_timeout_s=1)
    det = StatefulDetector(k=2, history=50, threshold=1e9, shared=store)
    x = digits_splits.test.x[:1].expand(10, -1, -1, -1)
    det.observe("a", x)
    v2 = det.observe("a", x)
    assert v2.flagged and v2.n_seen == 20 and store.unavailable == 2
    assert sum("shared query history unavailable" in r.getMessage() for r in caplog.records) == 1  # once an outage


def test_a_shared_history_must_have_its_shape():
    with pytest.raises(ConfigError, match="not a SharedHistory"):
        StatefulDetector(threshold=1.0, shared=object())
    assert isinstance(DatabaseHistory.__new__(DatabaseHistory), SharedHistory)


def test_revision_0001_upgrades_to_the_history_tables_keeping_audit_rows(db_url):
    engine = engines.open_engine(db_url, flag="--audit", create=True)
    with engines.write(engine, what="test") as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(migrate.SCRIPT_LOCATION))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    engine.dispose()
    with engines.write(engines.open_engine(db_url, flag="--audit"), what="test") as conn:
        conn.exec_driver_sql("INSERT INTO audit (ts, request_id, http_status) VALUES (1.0, 'r0', 200)")
    head = migrate.head()
    with pytest.raises(UserError, match=f"revision 0001; this safedl needs revision {head}"):
        DatabaseHistory(db_url)
    res = CliRunner().invoke(cli, ["db", "upgrade", db_url])
    assert res.exit_code == 0 and f"revision {head} (was 0001)" in res.output, res.output
    assert [r["request_id"] for r in read_rows(db_url)] == ["r0"]
    DatabaseHistory(db_url).close()
    AuditStore(db_url).close()
    if not engines.looks_like_url(db_url):
        names = {r[0] for r in sqlite3.connect(db_url).execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"query_history", "query_history_keys"} <= names


def test_an_empty_batch_is_counted_as_nothing(db_url, digits_splits):
    a, b = (StatefulDetector(k=2, history=50, threshold=1.0, shared=DatabaseHistory(db_url)) for _ in range(2))
    x = digits_splits.test.x[:5]
    a.observe("k", x)
    assert b.observe("k", x[:0]).n_seen == 5 and a.observe("k", x).n_seen == 10 and b.observe("k", x).n_seen == 15


def _writer(url: str, who: int, rounds: int, go, out) -> None:
    """One replica: ``rounds`` exchanges of one query each (its features: who, round); what it ends up holding."""
    store = DatabaseHistory(url)
    held, since = [], None
    go.wait()
    for i in range(rounds):
        ex = store.exchange(detector="d", key="k", feats=torch.tensor([[float(who), float(i)]]), since=since,
                            window=10_000)
        assert ex is not None and ex.lost == 0
        held += [tuple(r) for r in ex.earlier.tolist()] + [(float(who), float(i))]
        since = ex.n_before + 1
    out.put((who, held))
    store.close()


def test_concurrent_replicas_each_hold_the_whole_stream_in_order(db_url):
    """Four processes exchanging on one key at once: each one's view (what it got, then its own query, exchange
    after exchange) is the key's stream in the database's order up to its last query: nothing lost, nothing
    twice (on PostgreSQL, rows committed while an exchange waited for the key's lock are read again)."""
    DatabaseHistory(db_url).close()  # the schema, before the race
    go, out = FORK.Event(), FORK.Queue()
    procs = [FORK.Process(target=_writer, args=(db_url, w, 40, go, out)) for w in range(4)]
    for p in procs:
        p.start()
    go.set()
    views = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    with engines.read(DatabaseHistory(db_url).engine, what="test") as conn:
        rows = conn.exec_driver_sql("SELECT seq, n, dim, feats FROM query_history ORDER BY seq").all()
    stream = [tuple(r) for r in decode(rows, dim=2)[0].tolist()]
    assert len(stream) == 160 and len(set(stream)) == 160
    for who, view in views.items():
        assert view == stream[:len(view)] and view[-1] == (float(who), 39.0), who
