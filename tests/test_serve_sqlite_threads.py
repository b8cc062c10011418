"""Connections per thread (serve/_sqlite.PerThread): a worker pool retires idle threads and starts new ones, so a
connection kept for every thread ever started is a leak. Finding (main at 2ebdd59): 50 short-lived threads left
50 open connections (100 descriptors); the server's RSS crept up over the red-team bench's rotation."""
from __future__ import annotations

import gc
import os
import threading

from safedl.serve._sqlite import PerThread


def _open_descriptors(name: str) -> int:
    fds = os.listdir("/proc/self/fd")
    return sum(1 for fd in fds if os.path.realpath(f"/proc/self/fd/{fd}").endswith(name))


def test_a_thread_s_connection_is_closed_when_the_thread_ends(tmp_path):
    conns = PerThread(tmp_path / "t.db")
    conns.get().execute("CREATE TABLE t (x)")
    for _ in range(50):
        t = threading.Thread(target=lambda: conns.get().execute("INSERT INTO t VALUES (1)"))
        t.start()
        t.join()
    gc.collect()
    assert _open_descriptors("t.db") <= 2  # this thread's connection only (a file's descriptor, not one per thread)
    assert conns.get().execute("SELECT count(*) FROM t").fetchone() == (50,)
    same = conns.get()
    assert conns.get() is same  # one connection per thread, reused
    conns.close()
    assert _open_descriptors("t.db") == 0
