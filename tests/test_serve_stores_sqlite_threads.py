"""Connections and threads: a worker pool retires idle threads and starts new ones, so a connection kept for every
thread ever started is a leak. Finding (main at 2ebdd59, when the stores kept one SQLite connection per thread):
50 short-lived threads left 50 open connections (100 descriptors); the server's RSS crept up over the red-team
bench's rotation. The stores now share one bounded pool per database (serve/stores/engine.py): the descriptors
are bounded by the pool's size, not by the threads ever started."""
from __future__ import annotations

import gc
import os
import threading

from safedl.serve.keys import KeyStore
from safedl.serve.limits import RateLimiter
from safedl.serve.stores.engine import MAX_OVERFLOW, POOL_SIZE


def _open_descriptors(path) -> int:
    """Descriptors of exactly this file: a suffix match also counted other tests' leftover ``audit.db`` handles
    in the same xdist worker (17 against 16, once)."""
    target = os.path.realpath(path)
    return sum(1 for fd in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{fd}") == target)


def test_threads_that_end_leave_no_connection_behind(tmp_path):
    db = tmp_path / "t.db"
    store = KeyStore(db, create=True)
    key, token = store.create(name="k", rate_per_s=1e6, burst=10**6)
    lim = RateLimiter(store)
    results = []

    def use() -> None:
        results.append(store.authenticate(token) == key and lim.take(key).allowed)

    for _ in range(50):
        t = threading.Thread(target=use)
        t.start()
        t.join()
    gc.collect()
    assert results == [True] * 50
    assert _open_descriptors(db) <= POOL_SIZE  # one pooled connection reused, not one per thread
    for _ in range(2):  # more threads at once than the pool holds, twice: bounded, not growing
        busy = [threading.Thread(target=lambda: [use() for _ in range(10)]) for _ in range(3 * POOL_SIZE)]
        for t in busy:
            t.start()
        for t in busy:
            t.join()
        gc.collect()
        # SQLite keeps a closed connection's descriptor while other connections hold locks on the file, and reuses
        # it for the next one: at most one per connection the pool ever held at once
        assert all(results) and _open_descriptors(db) <= POOL_SIZE + MAX_OVERFLOW
    store.close()
    assert _open_descriptors(db) == 0
