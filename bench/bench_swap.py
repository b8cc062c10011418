"""Bundle hot swap under load (issue 13): does `safedl serve` answer every request while its bundle is swapped?

One run: the bench_serve set-up (``small_cnn`` on ``mnist5k``, seed, 2 epochs; the defended bundle = feature
squeezing + its detector, and the undefended bundle of the same model), then ``safedl serve`` on loopback loaded by
``--clients`` keep-alive clients for ``--seconds`` without swaps (the baseline), and again for ``--seconds`` while
an admin client swaps between the two bundles every ``--swap-every`` seconds (``POST /v1/admin/bundle``; every
swap verifies every file's sha256, rebuilds the pipeline and runs it once). Reports, for both phases, throughput,
p50/p95/p99 latency and the share of non-200 answers with its 95% Wilson interval, plus the swaps' durations
(admin request round trip) and outcomes. Target: zero non-200 answers during swaps.

    PYTHONPATH=src nice -n 10 .venv/bin/python bench/bench_swap.py --seconds 10 --clients 8 --swap-every 1 --seed 0
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve as bs  # noqa: E402  (its set-up, load generator and summaries: one implementation)

log = logging.getLogger("bench_swap")


def _swapper(url: str, token: str, paths: list[Path], every: float, stop: threading.Event, out: list) -> None:
    import httpx

    i = 0
    with httpx.Client(timeout=60.0) as c:
        while not stop.wait(every):
            path = paths[i % len(paths)]
            t0 = time.perf_counter()
            r = c.post(url + "/v1/admin/bundle", json={"path": str(path)}, headers={"X-API-Key": token})
            out.append({"seconds": time.perf_counter() - t0, "status": r.status_code,
                        "version": r.json().get("bundle_version")})
            i += 1


def _phase(port: int, reqs: list[bytes], clients: int, seconds: float, max_n: int) -> dict:
    from safedl.utils.stats import proportion

    samples, wall = asyncio.run(bs._load(port, reqs, clients, seconds, max_n))
    s = bs._summary(samples, wall)
    s["non_200_share"] = proportion(s["non_200"], s["requests"])
    return s


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="per phase")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--swap-every", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-requests", type=int, default=50_000, help="per phase")
    p.add_argument("--out", type=Path, default=None, help="also write the results here (JSON)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    with tempfile.TemporaryDirectory(prefix="bench_swap_") as tmp:
        work = Path(tmp)
        bundle, token, pngs = bs.prepare(work, args.seed)
        from safedl.serve.keys import KeyStore

        _, admin = KeyStore(work / "keys.db").create(name="ops", scopes=("admin",), rate_per_s=100, burst=100)
        port = bs._free_port()
        cmd = [sys.executable, "-m", "safedl.cli", "serve", str(bundle), "--keys", str(work / "keys.db"),
               "--audit", str(work / "audit.db"), "--port", str(port)]
        proc = bs._start(cmd, port, env, work / "serve.log")
        reqs = bs._requests(pngs, token)
        try:
            asyncio.run(bs._load(port, reqs, args.clients, 1.0, 200))  # warm-up
            baseline = _phase(port, reqs, args.clients, args.seconds, args.max_requests)
            swaps: list = []
            stop = threading.Event()
            t = threading.Thread(target=_swapper, args=(f"http://127.0.0.1:{port}", admin,
                                                        [work / "bundle_plain", bundle], args.swap_every, stop, swaps))
            t.start()
            try:
                during = _phase(port, reqs, args.clients, args.seconds, args.max_requests)
            finally:
                stop.set()
                t.join(120)
        finally:
            bs._stop(proc)
    dur = torch.tensor([s["seconds"] for s in swaps], dtype=torch.float64) * 1000.0
    result = {"seed": args.seed, "clients": args.clients, "seconds_per_phase": args.seconds,
              "swap_every_s": args.swap_every, "cpu_count": os.cpu_count(), "load_avg_at_end": os.getloadavg(),
              "baseline": baseline, "during_swaps": during,
              "swaps": {"n": len(swaps), "ok": sum(s["status"] == 200 for s in swaps),
                        "versions": sorted({s["version"] for s in swaps if s["version"]}),
                        "ms_median": round(float(dur.median()), 1) if len(dur) else None,
                        "ms_max": round(float(dur.max()), 1) if len(dur) else None},
              "targets": {"zero_non_200_during_swaps": during["non_200"] == 0}}
    print(json.dumps(result, indent=2))
    if args.out:
        from safedl.utils.io import atomic_write_json

        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
