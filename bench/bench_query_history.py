"""Issue 23, the stateful detector's shared per-key history (serve/stores/history.py): what it costs per observed
batch, and at which query an attack spread round-robin over R replicas is flagged, against the in-memory history.

- Cost: two detectors (two replicas: their own engine and writer id) on one key whose window is full (``history``
  queries), batches of 1 and 16 mnist5k images (784 pixels each) sent alternately; the median and p95 time of
  ``StatefulDetector.observe`` (k-NN included) and of the store exchange alone (one write transaction), against
  one in-memory detector that sees every query (the same window), on SQLite (a local file) and with
  ``--postgres`` on PostgreSQL; the backends take turns in blocks. Wall time and the calling thread's CPU time
  (the database server's work on PostgreSQL is in its own process: in the wall time only) (a throwaway local cluster, tests/_postgres.py,
  fsync off). This runs on the monitor's worker thread, not on the request path.
- Detection: per seed, a small_cnn trained one epoch on mnist5k (split seed = the seed), the stateful threshold
  calibrated as `safedl monitor calibrate` does (0.1% quantile over the benign calibration streams of the training
  split), a key sending 200 test images in order and then a Square attack (L-inf 0.05, 300 queries per image, seed)
  on 3 test images in batches of 16, round-robin over R = 1, 2, 4 replicas: the stream's number of the first
  flagged query with per-replica memory and with the shared history (SQLite).

    PYTHONPATH=src nice -n 10 /work/main/.venv/bin/python bench/bench_query_history.py --seeds 1 2 3 --postgres \
        --out bench/results/bench_query_history.json
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from safedl import registry
from safedl.data import load_builtin, stratified_split
from safedl.defenses.query import StatefulDetector
from safedl.defenses.query.streams import calibration_streams
from safedl.models import TrainRecipe, build_model, train_model, with_normalization
from safedl.serve.stores.history import DatabaseHistory
from safedl.utils.tensors import seed_everything

log = logging.getLogger("bench_query_history")
CHUNK = 16


class TimedHistory:
    """A SharedHistory that times each exchange of the store it wraps."""

    def __init__(self, store: DatabaseHistory):
        self.store, self.dtype, self.times = store, store.dtype, []

    def exchange(self, **kw):
        t0 = time.perf_counter()
        out = self.store.exchange(**kw)
        self.times.append(time.perf_counter() - t0)
        return out

    def forget(self, **kw):
        self.store.forget(**kw)


def _ms(v: list[float], q: float) -> float:
    return round(float(torch.quantile(torch.tensor(v, dtype=torch.float64), q)) * 1000.0, 3)


def _replicas(url: str | None, x: torch.Tensor, key: str, *, k: int, history: int) -> tuple[list, list]:
    """Two detectors (replicas) on ``url`` with the key's window already full; None: one detector in memory (one
    process seeing every query: the same window, the baseline)."""
    stores = [TimedHistory(DatabaseHistory(url)) for _ in range(2)] if url else []
    dets = [StatefulDetector(k=k, history=history, threshold=1.0, shared=stores[i] if stores else None)
            for i in range(2 if url else 1)]  # threshold: irrelevant to the cost
    dets = dets * (2 // len(dets))
    for i in range(0, history, CHUNK):
        dets[(i // CHUNK) % 2].observe(key, x[i:i + CHUNK])
    for s in stores:
        s.times.clear()
    return dets, stores


def cost(urls: dict[str, str | None], x: torch.Tensor, *, batches: int, blocks: int, k: int, history: int) -> dict:
    """observe/exchange times for batches of 1 and 16 on a key with a full window, two replicas alternating; the
    backends take turns in ``blocks`` blocks (drift on a shared machine hits them alike)."""
    out: dict = {}
    for size in (1, CHUNK):
        made = {b: _replicas(u, x, f"bench-{size}", k=k, history=history) for b, u in urls.items()}
        times: dict[str, list] = {b: [] for b in urls}
        cpu: dict[str, list] = {b: [] for b in urls}
        pos = history
        for _ in range(blocks):
            for b, (dets, _) in made.items():
                for j in range(batches // blocks):
                    pos = history + (pos + size - history) % (len(x) - history - size)
                    t0, c0 = time.perf_counter(), time.thread_time()
                    dets[j % 2].observe(f"bench-{size}", x[pos:pos + size])
                    times[b].append(time.perf_counter() - t0)
                    cpu[b].append(time.thread_time() - c0)
        for b, (dets, stores) in made.items():
            ex = [t for s in stores for t in s.times]
            out.setdefault(b, {})[str(size)] = {
                "observe_ms_p50": _ms(times[b], 0.5), "observe_ms_p95": _ms(times[b], 0.95), "n": len(times[b]),
                "observe_cpu_ms_p50": _ms(cpu[b], 0.5), "observe_cpu_ms_mean": round(1000 * statistics.mean(cpu[b]), 3),
                **({"exchange_ms_p50": _ms(ex, 0.5), "exchange_ms_p95": _ms(ex, 0.95)} if ex else {})}
            for s in stores:
                s.store.close()
    return out


def attack_stream(seed: int, splits, model) -> torch.Tensor:
    sent = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            sent.append(x.detach().clone())
            return model(x)

    square = registry.create("evasion", "square", eps=0.05, max_queries=300, seed=seed)
    for i in range(3):
        square(Recorder(), splits.test.x[i:i + 1], splits.test.y[i:i + 1])
    return torch.cat([splits.test.x[10:210], *sent])


def first_flag(dets: list[StatefulDetector], stream: torch.Tensor) -> int | None:
    for b, i in enumerate(range(0, len(stream), CHUNK)):
        batch = stream[i:i + CHUNK]
        v = dets[b % len(dets)].observe("attacker", batch)
        if v.flagged:
            return i + v.first_at - (v.n_seen - len(batch))
    return None


def detection(seed: int, work: Path, *, k: int, history: int) -> dict:
    splits = stratified_split(load_builtin("mnist5k"), test_fraction=0.2, val_fraction=0.1, seed=seed)
    seed_everything(seed)
    model = with_normalization(build_model("small_cnn", in_channels=1, num_classes=10, image_size=28),
                               splits.mean, splits.std)
    train_model(model, splits.train, recipe=TrainRecipe(epochs=1), seed=seed)
    model.eval()
    thr = StatefulDetector(k=k, history=history).calibrate(calibration_streams(splits.train.x, seed=seed)).threshold_
    stream = attack_stream(seed, splits, model)
    res = {"threshold": thr, "stream": len(stream), "attack_starts_after": 200}
    for r in (1, 2, 4):
        res[f"memory_x{r}"] = first_flag([StatefulDetector(k=k, history=history, threshold=thr)
                                          for _ in range(r)], stream)
        url = str(work / f"seed{seed}-x{r}.db")
        res[f"shared_sqlite_x{r}"] = first_flag([StatefulDetector(k=k, history=history, threshold=thr,
                                                                  shared=DatabaseHistory(url)) for _ in range(r)],
                                                stream)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--batches", type=int, default=300, help="timed observe calls per batch size and backend")
    ap.add_argument("--blocks", type=int, default=6, help="the backends take turns this many times")
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--history", type=int, default=1000)
    ap.add_argument("--postgres", action="store_true")
    ap.add_argument("--parts", nargs="+", choices=("cost", "detection"), default=["cost", "detection"])
    ap.add_argument("--out", default="/tmp/bench_query_history.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="safedl-history-"))
    x = load_builtin("mnist5k").x  # 5,000 distinct images: every timed batch is new to the window
    res: dict = {"args": vars(args), "torch_threads": 1}
    cluster = None
    if args.postgres:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from _postgres import Cluster, pg_bindir

        cluster = Cluster(pg_bindir()).start()
    try:
        urls = {"memory": None, "sqlite": str(work / "cost.db"),
                **({"postgresql": cluster.database()} if cluster is not None else {})}
        if "cost" in args.parts:
            res["cost"] = cost(urls, x, batches=args.batches, blocks=args.blocks, k=args.k, history=args.history)
            for backend in [b for b in urls if b != "memory"]:
                for what in ("observe_ms_p50", "observe_cpu_ms_mean"):
                    res["cost"][f"ratio_{backend}_vs_memory_{what}"] = {
                        s: round(res["cost"][backend][s][what] / res["cost"]["memory"][s][what], 2)
                        for s in res["cost"]["memory"]}
            log.info("cost: %s", json.dumps(res["cost"]))
        if "detection" in args.parts:
            res["detection"] = {str(s): detection(s, work, k=args.k, history=args.history) for s in args.seeds}
    finally:
        if cluster is not None:
            cluster.remove()
    Path(args.out).write_text(json.dumps(res, indent=1))
    log.info("%s", json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
