"""Throughput of ``safedl serve --workers 1|2`` and of a bare FastAPI endpoint under uvicorn ``--workers 1|2``,
measured with Apache Bench, in one run on loopback.

Setup as bench/bench_serve.py (``prepare``: ``small_cnn`` on ``mnist5k``, seed 0, 2 epochs; the default deployed
system, feature squeezing bit depth 4 + its detector, as a bundle; one API key without effective limits). Every
server process runs 1 torch thread (``--torch-threads 1``; the bare app sets it, and ``OMP_NUM_THREADS=1``). The
bare endpoint decodes the PNG and runs the model's forward pass, nothing else, on uvicorn's h11 protocol (the one
safedl's guarded protocol extends; httptools is not installed). Each server is loaded by
``ab -k -l -t SECONDS -n MAX -c C -p digit.png -T image/png [-H 'X-API-Key: ...']`` at each concurrency C, after a
2 s warm-up. h11 keeps no HTTP/1.0 connection alive, so ab's ``-k`` is refused and every request is a new
connection (ab reports the keep-alive count); the kernel hands each new connection to one worker.

Reports the server's CPU time per request (utime + stime from /proc/PID/stat of the server process and its worker
processes, read before and after each measured ab run, divided by ab's completed requests; much less sensitive than
req/s to other load on the machine; a PostgreSQL server's own CPU is not in it), requests/s, p50 and p99 (ab's whole
milliseconds), non-2xx and failed counts, the load average around each measurement (another benchmark may share the
machine), the ratios 2 workers / 1 worker and safedl / bare, and for
safedl whether the audit database holds a row for every answered request.

    PYTHONPATH=src nice -n 10 /work/main/.venv/bin/python bench/bench_workers.py --seconds 15 --levels 8,32 --seed 0
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import _free_port, _start, _stop, bare_app, prepare  # noqa: E402

log = logging.getLogger("bench_workers")
AB = "/usr/bin/ab"
BUNDLE_ENV = "BENCH_WORKERS_BUNDLE"


def bare_factory():
    """The bare endpoint for ``uvicorn --factory`` (each uvicorn worker calls it); the bundle: $BENCH_WORKERS_BUNDLE."""
    import torch

    torch.set_num_threads(1)
    return bare_app(os.environ[BUNDLE_ENV])


def parse_ab(text: str) -> dict:
    """Requests/s, latency percentiles (ms), counts from ab's report."""
    def num(pattern: str, default: float | None = None) -> float | None:
        m = re.search(pattern, text, re.MULTILINE)
        return float(m.group(1)) if m else default

    return {"requests": int(num(r"^Complete requests:\s+(\d+)", 0)),
            "throughput_rps": num(r"^Requests per second:\s+([\d.]+)"),
            "p50_ms": num(r"^\s+50%\s+(\d+)"), "p99_ms": num(r"^\s+99%\s+(\d+)"),
            "non_2xx": int(num(r"^Non-2xx responses:\s+(\d+)", 0)),
            "failed": int(num(r"^Failed requests:\s+(\d+)", 0)),
            "keep_alive": int(num(r"^Keep-Alive requests:\s+(\d+)", 0))}


def run_ab(*, port: int, body: Path, token: str | None, concurrency: int, seconds: float, max_n: int) -> dict:
    cmd = [AB, "-k", "-l", "-q", "-s", "30", "-t", str(seconds), "-n", str(max_n), "-c", str(concurrency),
           "-p", str(body), "-T", "image/png"]
    if token:
        cmd += ["-H", f"X-API-Key: {token}"]
    cmd.append(f"http://127.0.0.1:{port}/v1/predict")
    load0 = os.getloadavg()[0]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    if res.returncode != 0:
        raise RuntimeError(f"ab failed ({res.returncode}): {res.stderr[-2000:]}")
    return {**parse_ab(res.stdout), "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the server and its worker processes), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo += children.get(out[-1], [])
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (seconds; one that exited counts 0)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _wait_log(log_path: Path, marker: str, count: int, timeout: float = 180.0) -> None:
    """Wait until ``marker`` is in the server's log ``count`` times (every worker started, not only the first)."""
    deadline = time.monotonic() + timeout
    while log_path.read_text(errors="replace").count(marker) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{marker!r} not logged {count} times: {log_path.read_text()[-2000:]}")
        time.sleep(0.2)


def measure(name: str, cmd: list[str], *, port: int, env: dict, log_path: Path, ready: tuple[str, int], body: Path,
            token: str | None, levels: list[int], seconds: float, max_n: int) -> tuple[dict, int, int]:
    """Per concurrency: ab's summary; plus the requests completed and answered 2xx (warm-ups included)."""
    proc = _start(cmd, port, env, log_path)
    out, done, ok = {}, 0, 0
    try:
        _wait_log(log_path, *ready)
        pids = process_tree(proc.pid)
        for c in levels:
            warm = run_ab(port=port, body=body, token=token, concurrency=c, seconds=2, max_n=max_n)
            cpu0 = cpu_seconds(pids)
            out[str(c)] = run_ab(port=port, body=body, token=token, concurrency=c, seconds=seconds, max_n=max_n)
            out[str(c)]["cpu_ms_per_request"] = round((cpu_seconds(pids) - cpu0) * 1000.0
                                                      / max(1, out[str(c)]["requests"]), 3)
            for r in (warm, out[str(c)]):
                done += r["requests"]
                ok += r["requests"] - r["non_2xx"]
            log.info("%s, -c %d: %s", name, c, out[str(c)])
    finally:
        _stop(proc)
    return out, done, ok


def _ratios(num: dict, den: dict, field: str = "throughput_rps") -> dict:
    return {c: round(num[c][field] / den[c][field], 3) for c in num if c in den and den[c][field]}


def _audit(db: Path, done: int, ok: int, in_flight: int) -> dict:
    """Audit rows against ab's counts: ab -t stops with up to -c requests in flight, which the server answers (and
    audits) but ab does not count, so 0 <= rows - answered <= the sum of the concurrencies."""
    conn = sqlite3.connect(db)
    rows, rows_ok = conn.execute("SELECT COUNT(*), SUM(http_status = 200) FROM audit WHERE endpoint='/v1/predict'"
                                 ).fetchone()
    statuses = dict(conn.execute("SELECT COALESCE(error, CAST(http_status AS TEXT)), COUNT(*) FROM audit WHERE "
                                 "endpoint='/v1/predict' AND http_status != 200 GROUP BY 1").fetchall())
    conn.close()
    return {"answered": done, "answered_2xx": ok, "rows": rows, "rows_200": rows_ok or 0, "rows_not_200": statuses,
            "rows_cover_answered": 0 <= rows - done <= in_flight and 0 <= (rows_ok or 0) - ok <= in_flight}


def _postgres_cluster():
    """A throwaway PostgreSQL cluster on 127.0.0.1 (the tests' own, tests/_postgres.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _postgres import Cluster, pg_bindir

    return Cluster(pg_bindir()).start()


def _postgres_key(url: str) -> str:
    """A key without effective limits in the database at ``url`` (as bench_serve.prepare makes in SQLite)."""
    from safedl.serve.keys import KeyStore

    keys = KeyStore(url, create=True)
    try:
        return keys.create(name="bench", tier="rounded", rate_per_s=1e6, burst=10**6, daily_quota=10**9)[1]
    finally:
        keys.close()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=15.0, help="per measurement (ab -t)")
    p.add_argument("--levels", default="8,32", help="ab concurrencies")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-requests", type=int, default=50_000, help="per measurement (ab -n)")
    p.add_argument("--out", type=Path, default=None, help="also write the results here (JSON)")
    p.add_argument("--postgres", action="store_true", help="also measure safedl with its keys, limits and audit on "
                   "PostgreSQL (a throwaway local cluster, tests/_postgres.py: fsync off)")
    p.add_argument("--plain", action="store_true", help="serve the undefended bundle of the same model with safedl "
                   "(the service's own cost against the bare endpoint: no detector, no preprocessor)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    levels, counts = [int(v) for v in args.levels.split(",")], [int(v) for v in args.workers.split(",")]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root / "src"), OMP_NUM_THREADS="1")
    load_start = os.getloadavg()
    results: dict = {"bare": {}, "safedl": {}, "audit": {}, **({"safedl_postgres": {}} if args.postgres else {})}
    cluster = _postgres_cluster() if args.postgres else None
    with tempfile.TemporaryDirectory(prefix="bench_workers_") as tmp:
        work = Path(tmp)
        bundle, token, pngs = prepare(work, args.seed)
        served = bundle.parent / "bundle_plain" if args.plain else bundle
        body = work / "digit.png"
        body.write_bytes(pngs[0])
        common = dict(body=body, levels=levels, seconds=args.seconds, max_n=args.max_requests)
        for n in counts:
            port = _free_port()
            cmd = [sys.executable, "-m", "uvicorn", "--factory", "bench_workers:bare_factory", "--app-dir",
                   str(Path(__file__).resolve().parent), "--host", "127.0.0.1", "--port", str(port), "--workers",
                   str(n), "--http", "h11", "--log-level", "info", "--no-access-log"]
            results["bare"][str(n)], _, _ = measure(f"bare x{n}", cmd, port=port, log_path=work / f"bare{n}.log",
                                                    token=None, env={**env, BUNDLE_ENV: str(bundle)},
                                                    ready=("Application startup complete.", n), **common)
            port, db = _free_port(), work / f"audit{n}.db"
            cmd = [sys.executable, "-m", "safedl.cli", "serve", str(served), "--keys", str(work / "keys.db"),
                   "--audit", str(db), "--port", str(port), "--workers", str(n), "--torch-threads", "1"]
            results["safedl"][str(n)], done, ok = measure(
                f"safedl x{n}", cmd, port=port, log_path=work / f"safedl{n}.log", token=token, env=env,
                ready=('"event": "workers_ready"', 1) if n > 1 else ('"event": "start"', 1), **common)
            results["audit"][str(n)] = _audit(db, done, ok, in_flight=2 * sum(levels))
            time.sleep(1.0)
            if cluster is not None:
                url, port = cluster.database(), _free_port()
                pg_token = _postgres_key(url)
                cmd = [sys.executable, "-m", "safedl.cli", "serve", str(served), "--keys", url, "--audit", url,
                       "--port", str(port), "--workers", str(n), "--torch-threads", "1"]
                results["safedl_postgres"][str(n)], _, _ = measure(
                    f"safedl on postgresql x{n}", cmd, port=port, log_path=work / f"pg{n}.log", token=pg_token,
                    env=env, ready=('"event": "workers_ready"', 1) if n > 1 else ('"event": "start"', 1), **common)
                time.sleep(1.0)
    if cluster is not None:
        cluster.remove()
    out = {"seed": args.seed, "safedl_bundle": "plain" if args.plain else "defended",
           "seconds_per_measurement": args.seconds, "cpu_count": os.cpu_count(),
           "load_avg_at_start": [round(v, 2) for v in load_start],
           "load_avg_at_end": [round(v, 2) for v in os.getloadavg()], **results,
           "ratio_2_vs_1_workers": {k: _ratios(results[k]["2"], results[k]["1"]) for k in ("bare", "safedl")
                                    if "1" in results[k] and "2" in results[k]},
           "ratio_safedl_vs_bare": {n: _ratios(results["safedl"][n], results["bare"][n]) for n in results["safedl"]},
           "ratio_postgres_vs_sqlite": {n: _ratios(v, results["safedl"][n])
                                        for n, v in results.get("safedl_postgres", {}).items()},
           "cpu_ms_ratio_safedl_vs_bare": {n: _ratios(results["safedl"][n], results["bare"][n], "cpu_ms_per_request")
                                           for n in results["safedl"]},
           "cpu_ms_ratio_postgres_vs_sqlite": {n: _ratios(v, results["safedl"][n], "cpu_ms_per_request")
                                               for n, v in results.get("safedl_postgres", {}).items()}}
    print(json.dumps(out, indent=2))
    if args.out:
        from safedl.utils.io import atomic_write_json

        atomic_write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
