"""Throughput of the stores' per-request work, SQLite vs PostgreSQL: one ``RateLimiter.take(key)`` plus one audit
row committed (``AuditStore.submit(rows).result()``, the writer thread's group commit), as every keyed request does.

For each backend and each thread count T: T threads in one process loop for SECONDS on take()+audit with one key
without effective limits (the bucket's row is the one every thread updates: the worst case for contention) after
a 1 s warm-up; reported: operations/s, p50 and p99 latency per operation, and the check that the audit holds one
row per operation. SQLite: files in a temporary folder (WAL, synchronous=NORMAL, as the service). PostgreSQL:
``--pg URL`` (an empty database), or, without it, a throwaway cluster started as tests/_postgres.py does
(fsync off: a lower bound on a durable server's latency; say so when quoting the numbers).

    PYTHONPATH=src:tests nice -n 10 /work/main/.venv/bin/python bench/stores.py --seconds 5 --threads 1,4,16

``--backends sqlite`` runs SQLite only (e.g. against an older checkout's stores, to compare).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from safedl.serve.audit import AuditStore, read_rows
from safedl.serve.keys import KeyStore
from safedl.serve.limits import RateLimiter

log = logging.getLogger("bench.stores")


def measure(url: str, *, threads: int, seconds: float) -> dict:
    keys = KeyStore(url, create=True)
    key, _ = keys.create(name=f"bench{threads}_{time.time_ns()}", rate_per_s=1e9, burst=10**12, daily_quota=10**15)
    lim = RateLimiter(keys)
    audit = AuditStore(url)
    audit.start()
    lat: list[float] = []
    lock = threading.Lock()
    stop_at = [0.0]
    warm_until = time.monotonic() + 1.0
    stop_at[0] = warm_until + seconds

    def run(i: int) -> None:
        mine, n = [], 0
        while True:
            t0 = time.monotonic()
            if t0 >= stop_at[0]:
                break
            assert lim.take(key).allowed
            audit.submit([{"ts": time.time(), "request_id": f"b{threads}-{i}-{n}", "key_id": key.key_id,
                           "http_status": 200, "endpoint": "/bench"}]).result(30)
            n += 1
            if t0 >= warm_until:
                mine.append(time.monotonic() - t0)
        with lock:
            lat.extend(mine)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    audit.close()
    keys.close()
    rows = sum(1 for r in read_rows(url) if str(r["request_id"]).startswith(f"b{threads}-"))
    lat.sort()
    return {"threads": threads, "ops": len(lat), "ops_per_s": round(len(lat) / seconds, 1),
            "p50_ms": round(1000 * statistics.median(lat), 3) if lat else None,
            "p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 3) if lat else None,
            "audit_rows_incl_warmup": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--threads", default="1,4,16")
    ap.add_argument("--pg", default=None, help="an empty PostgreSQL database (default: a throwaway cluster)")
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    levels = [int(x) for x in args.threads.split(",")]
    cluster = None
    pg = args.pg
    backends = args.backends.split(",")
    if pg is None and "postgresql" in backends:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from _postgres import Cluster, pg_bindir

        cluster = Cluster(pg_bindir()).start()
        pg = cluster.database()
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="safedl-bench-stores-") as tmp:
            for backend, url in (("sqlite", os.path.join(tmp, "state.db")), ("postgresql", pg)):
                if backend not in backends:
                    continue
                for t in levels:
                    r = {"backend": backend, **measure(url, threads=t, seconds=args.seconds)}
                    results.append(r)
                    print(json.dumps(r), flush=True)
    finally:
        if cluster is not None:
            cluster.remove()
    meta = {"seconds": args.seconds, "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
            "postgresql": "throwaway cluster, fsync off" if cluster is not None else "given URL"}
    print("| backend | threads | take()+audit ops/s | p50 ms | p99 ms |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['backend']} | {r['threads']} | {r['ops_per_s']} | {r['p50_ms']} | {r['p99_ms']} |")
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
