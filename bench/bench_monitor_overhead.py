"""What the security monitor adds to a predict request (issue 13): the same bundle served in-process (FastAPI
TestClient, one sequential client, single-PNG requests of mnist5k test digits) with and without
``--monitor-config``, alternating blocks of requests so drift on a shared machine hits both alike.

Reports: p50/p95 request latency with and without the monitor and their difference; the cost of
``SecurityMonitor.observe`` on the request path (it only enqueues); the worker's time per batch off the request
path (stateful k-NN over 1,000 remembered queries, PRADA, volume, windows, rules), from
``safedl_monitor_observe_seconds``; the cost of reading a key's automatic actions on every request (on in both
configurations, so not in the difference). The bundle and key come from ``bench_serve.prepare`` (small_cnn, mnist5k,
2 epochs, seed); the thresholds from ``safedl.serve.monitor.calibration.calibrate`` on the training split.

    PYTHONPATH=src nice -n 10 .venv/bin/python bench/bench_monitor_overhead.py --requests 600 --seed 0
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_serve import prepare  # noqa: E402  (bench/ is on sys.path when run as a script)

log = logging.getLogger("bench_monitor_overhead")


def _pct(v: list[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(v, dtype=torch.float64), q)) * 1000.0


def enforce_us(work: Path, n: int = 5000) -> dict:
    """Cost of reading a key's active actions on every request (``KeyActions.enforce``), without and with one."""
    import timeit

    from safedl.serve.keys import KeyStore
    from safedl.serve.monitor.store import KeyActions

    store = KeyStore(work / "enforce.db", create=True)
    key, _ = store.create(name="probe")
    acts = KeyActions(store)
    for i in range(200):
        acts.record(key_id=f"other{i:03d}", action="throttle", reason="bench", alert_id=None)
    out = {"no_action": timeit.timeit(lambda: acts.enforce(key), number=n) / n * 1e6}
    acts.record(key_id=key.key_id, action="labels_only", reason="bench", alert_id=None)
    out["one_action"] = timeit.timeit(lambda: acts.enforce(key), number=n) / n * 1e6
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=600, help="per configuration")
    ap.add_argument("--block", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/bench_monitor_overhead.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("safedl.serve", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(1)
    from fastapi.testclient import TestClient

    from safedl.data import load_builtin, stratified_split
    from safedl.deploy import load_bundle
    from safedl.serve import create_app
    from safedl.serve.audit import AuditStore
    from safedl.serve.keys import KeyStore
    from safedl.serve.monitor import DEFAULT_RULES, load_monitor_config
    from safedl.serve.monitor.calibration import calibrate, save_calibration

    work = Path(tempfile.mkdtemp(prefix="bench-monitor-"))
    bundle_path, token, pngs = prepare(work, args.seed)
    bundle = load_bundle(bundle_path)
    splits = stratified_split(load_builtin("mnist5k"), test_fraction=0.2, val_fraction=0.1, seed=args.seed)
    rec = calibrate(bundle, splits.train.x, seed=args.seed)
    log.info("calibrated in %.1fs: %s %s", rec["seconds"], rec["stateful"], rec["prada"])
    save_calibration(rec, work / "calibration.json")
    cfg = load_monitor_config(DEFAULT_RULES).model_copy(update={"calibration": work / "calibration.json"})
    cfg = cfg.model_copy(update={"sinks": cfg.sinks.model_copy(update={"jsonl": work / "alerts.jsonl"})})
    keys = KeyStore(work / "keys.db")
    apps = {"off": create_app(bundle=bundle, keys=keys, audit=AuditStore(work / "audit_off.db")),
            "on": create_app(bundle=bundle, keys=keys, audit=AuditStore(work / "audit_on.db"), monitor_config=cfg)}
    mon = apps["on"].state.service.monitor
    enqueue: list[float] = []
    observe = mon.observe

    def timed_observe(*a, **kw):
        t0 = time.perf_counter()
        observe(*a, **kw)
        enqueue.append(time.perf_counter() - t0)

    mon.observe = timed_observe
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "image/png"}
    lat: dict[str, list[float]] = {"off": [], "on": []}
    with TestClient(apps["off"]) as off, TestClient(apps["on"]) as on:
        clients = {"off": off, "on": on}
        for c in clients.values():  # warm-up
            for p in pngs[:20]:
                c.post("/v1/predict", content=p, headers=headers)
        i = 0
        while len(lat["on"]) < args.requests:
            for name in ("off", "on"):
                for _ in range(args.block):
                    t0 = time.perf_counter()
                    r = clients[name].post("/v1/predict", content=pngs[i % len(pngs)], headers=headers)
                    lat[name].append(time.perf_counter() - t0)
                    assert r.status_code == 200, r.text
                    i += 1
        mon.flush()
        work_s = [s for s in apps["on"].state.service.metrics.registry.collect()
                  if s.name == "safedl_monitor_observe_seconds"][0].samples
    total = {s.name: s.value for s in work_s if s.name.endswith(("_sum", "_count"))}
    res = {"seed": args.seed, "requests_per_config": args.requests, "torch_threads": 1,
           "latency_ms": {n: {"p50": _pct(v, 0.5), "p95": _pct(v, 0.95)} for n, v in lat.items()},
           "added_p50_ms": _pct(lat["on"], 0.5) - _pct(lat["off"], 0.5),
           "added_p95_ms": _pct(lat["on"], 0.95) - _pct(lat["off"], 0.95),
           "observe_call_us": {"median": statistics.median(enqueue) * 1e6, "p99": _pct(enqueue, 0.99) * 1000},
           "worker_ms_per_batch": 1000 * total["safedl_monitor_observe_seconds_sum"]
           / max(1, total["safedl_monitor_observe_seconds_count"]),
           "enforce_us": enforce_us(work),
           "calibration": {"stateful_threshold": rec["stateful"]["threshold"], "prada_delta": rec["prada"]["delta"]}}
    Path(args.out).write_text(json.dumps(res, indent=1))
    log.info("%s", json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
