"""Verified keys are cached per process (serve/key_cache.py) and a revocation made anywhere reaches every process's
cache at once: on SQLite the next lookup after ``revoke`` returns, on PostgreSQL when its NOTIFY arrives (well
within the TTL); a revocation by other means is seen within the TTL."""
from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from safedl.serve.key_cache import SqliteGeneration, VerifiedKeyCache
from safedl.serve.keys import KeyStore


def _two_workers(db, ttl_s=60.0):
    """Two processes' key stores (own engines, own caches) on one database, as two workers or replicas have."""
    return KeyStore(db, cache_ttl_s=ttl_s), KeyStore(db, cache_ttl_s=ttl_s)


def _revoked_everywhere(stores, token, *, within_s):
    t0 = time.monotonic()
    while time.monotonic() - t0 < within_s:
        if all(s.authenticate(token) is None for s in stores):
            return time.monotonic() - t0
        time.sleep(0.01)
    return None


def test_sqlite_a_revoked_key_fails_on_the_next_lookup_of_every_worker(tmp_path):
    db = tmp_path / "k.db"
    admin = KeyStore(db, create=True)
    key, token = admin.create(name="u")
    a, b = _two_workers(db)
    for s in (a, b):
        assert s.authenticate(token) == key and s.authenticate(token) == key
        assert s._cache.hits >= 1  # the second lookup came from the cache
    admin.revoke("u")  # as `safedl keys revoke` does, in another process
    assert a.authenticate(token) is None and b.authenticate(token) is None
    for s in (a, b, admin):
        s.close()


def test_a_revocation_without_the_signal_is_seen_within_the_ttl(tmp_path):
    db = tmp_path / "k.db"
    admin = KeyStore(db, create=True)
    key, token = admin.create(name="u")
    now = [0.0]
    store = KeyStore(db)
    cache = VerifiedKeyCache(SqliteGeneration(db), ttl_s=2.0, clock=lambda: now[0])
    assert cache.authenticate(token, store.authenticate) == key
    with admin.engine.begin() as conn:  # by hand: no sidecar written
        conn.execute(sa.text("UPDATE api_keys SET revoked_at = 1 WHERE name = 'u'"))
    now[0] = 1.9
    assert cache.authenticate(token, store.authenticate) == key  # the documented bound: up to the TTL
    now[0] = 2.0
    assert cache.authenticate(token, store.authenticate) is None
    for s in (store, admin):
        s.close()


def test_wrong_tokens_are_never_cached(tmp_path):
    db = tmp_path / "k.db"
    admin = KeyStore(db, create=True)
    _, token = admin.create(name="u")
    (a,) = _two_workers(db)[:1]
    wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert a.authenticate(wrong) is None and a.authenticate(wrong) is None and a._cache.hits == 0
    a.close()
    admin.close()


def test_postgresql_a_revocation_reaches_every_replica_by_notify(pg_cluster):
    url = pg_cluster.database()
    admin = KeyStore(url, create=True)
    key, token = admin.create(name="u")
    a, b = _two_workers(url, ttl_s=60.0)
    deadline = time.monotonic() + 10
    while (a._cache.generation() is None or b._cache.generation() is None) and time.monotonic() < deadline:
        time.sleep(0.02)  # the listeners connect
    for s in (a, b):
        assert s.authenticate(token) == key and s.authenticate(token) == key and s._cache.hits >= 1
    admin.revoke("u")
    took = _revoked_everywhere((a, b), token, within_s=5.0)
    assert took is not None and took < 5.0  # the TTL is 60 s: only the notification explains it
    for s in (a, b, admin):
        s.close()
