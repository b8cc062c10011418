"""The game day's scenarios (a registry by name): each is an action against the deployment, bounded in count and
time, and the alerts expected of it with their targets.

- ``corrupt_bundle``: a copy of the served bundle with one byte of a state file flipped, offered by
  ``POST /v1/admin/bundle``; expected: the swap is refused (SafedlBundleSwapFailed) and the old bundle still serves.
- ``keyless_flood``: requests without a key; expected: the pre-authentication limiter answers 429 and
  SafedlKeylessFlood (more than 100 refusals before authentication in 5 minutes) pages.
- ``extraction_run``: Jacobian-based augmentation (Papernot et al. 2017) through a label key; expected: PRADA
  (Juuti et al. 2019) flags it (monitor rule extraction_suspected, SafedlExtractionAttempt).
- ``drifted_stream``: inverted test images (1 - x) from one key; expected: input_drift (MMD test) fires.
- ``kill_worker``: SIGKILL to one worker of ``--workers 2``; expected: the supervisor restarts it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from safedl.redteam.gameday.watch import Expectation, counter_rose, gauge_at_most, monitor_alert
from safedl.serve.client import RemoteClassifier, ServiceError

log = logging.getLogger("safedl.redteam.gameday")


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    action: Callable[[Any, Any], dict[str, Any]]
    expect: list[Expectation] = field(default_factory=list)
    watch_s: float = 60.0
    workers: int = 1


def corrupt_bundle(dep: Any, ctx: Any) -> dict[str, Any]:
    bad = dep.workdir / "corrupt-bundle"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(dep.bundle, bad)
    state = max((p for p in bad.rglob("*") if p.is_file() and p.name != "manifest.json"), key=lambda p: p.stat().st_size)
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    with dep.client("admin") as c:
        before = c.get("/v1/model")["bundle_version"]
        try:
            c.request("POST", "/v1/admin/bundle", body=json.dumps({"path": str(bad)}).encode(),
                      content_type="application/json")
            status = 200
        except ServiceError as exc:
            status = exc.status
        after = c.get("/v1/model")["bundle_version"]
    return {"corrupted_file": state.name, "swap_status": status, "still_serving_old_bundle": before == after,
            "ready": dep.ready()}


def keyless_flood(dep: Any, ctx: Any, *, requests: int = 300) -> dict[str, Any]:
    import http.client

    codes: dict[int, int] = {}
    for _ in range(requests):
        conn = http.client.HTTPConnection("127.0.0.1", dep.port, timeout=5)
        try:
            conn.request("POST", "/v1/predict", body=b"x", headers={"Content-Type": "application/x-npy"})
            status = conn.getresponse().status
        except OSError:
            status = 0
        finally:
            conn.close()
        codes[status] = codes.get(status, 0) + 1
    return {"requests": requests, "status_counts": {str(k): v for k, v in sorted(codes.items())},
            "ready": dep.ready()}


def extraction_run(dep: Any, ctx: Any, *, budget: int = 600) -> dict[str, Any]:
    from safedl import registry
    from safedl.attacks.extraction.base import ExtractionOracle
    from safedl.errors import QueryBudgetExceeded

    attack = registry.create("extraction", "jacobian_augmentation", seed_size=50, surrogate="tiny_cnn", epochs=1,
                             seed=0)
    remote = RemoteClassifier(dep.client("label"), access="labels", max_queries=budget, deadline_s=ctx.seconds,
                              max_images=50, on_reject="uniform")
    try:
        attack.extract(ExtractionOracle(remote, budget=budget, output="labels"), ctx.x_seed, num_classes=10)
        stopped = None
    except (QueryBudgetExceeded, ServiceError) as exc:
        stopped = str(exc)
    return {"queries": remote.queries_, "stopped": stopped}


def drifted_stream(dep: Any, ctx: Any, *, images: int = 400) -> dict[str, Any]:
    x = 1.0 - ctx.x_test[:images]
    sent = 0
    with dep.client("user") as c:
        for i in range(0, len(x), 50):
            sent += len(c.predict(x[i:i + 50])["results"])
    return {"images": sent, "shift": "inverted pixels (1 - x)"}


def _workers(pid: int) -> set[int]:
    """Worker processes of the supervisor ``pid``: its spawned children (multiprocessing's resource tracker not)."""
    out = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"resource_tracker" not in cmd:
            out.add(int(d.name))
    return out


def kill_worker(dep: Any, ctx: Any) -> dict[str, Any]:
    workers = sorted(_workers(dep.proc.pid))
    victim = workers[-1]
    dep.killed = victim
    os.kill(victim, signal.SIGKILL)
    ok, failed, first_error = 0, 0, None
    for _ in range(40):
        with dep.client("user") as c:  # a new connection each: the kernel spreads them over the workers
            try:
                c.predict(ctx.x_test[:4])
                ok += 1
            except (OSError, ServiceError) as exc:
                failed += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"
    return {"workers_before": len(workers), "killed_pid": victim, "requests_ok": ok, "requests_failed": failed,
            "first_error": first_error}


def _worker_back(dep: Any, _: float, __: Any) -> bool:
    """A new worker serves in the killed one's slot: the killed pid gone and one more 'worker serving' logged."""
    victim = getattr(dep, "killed", None)
    return victim is not None and victim not in _workers(dep.proc.pid) and dep.serving_workers() > dep.workers


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("corrupt_bundle", "a bundle with one flipped byte offered for a hot swap", corrupt_bundle,
             [counter_rose("SafedlBundleSwapFailed", "safedl_bundle_swaps_total", 10,
                           outcome={"refused", "failed"})], watch_s=20),
    Scenario("keyless_flood", "300 predict requests without an API key", keyless_flood,
             [counter_rose("SafedlKeylessFlood", "safedl_unauthenticated_total", 10, more_than=100),
              counter_rose("pre-auth limiter answers 429", "safedl_requests_total", 10, status="429")], watch_s=20),
    Scenario("extraction_run", "Jacobian-augmentation extraction through a label key (600 queries)",
             extraction_run, [monitor_alert("extraction_suspected", 60),
                              counter_rose("SafedlExtractionAttempt", "safedl_extraction_attempts_total", 60)],
             watch_s=90),
    Scenario("drifted_stream", "the test split (at most 400 images) inverted, from one key", drifted_stream,
             [monitor_alert("input_drift", 30),
              gauge_at_most("SafedlInputDrift", "safedl_drift_p_value", 0.005, 30, test="input")], watch_s=45),
    Scenario("kill_worker", "SIGKILL to one of two workers while requests flow", kill_worker,
             [Expectation("worker restarted and serving", "deployment", 60, _worker_back)], watch_s=120, workers=2),
)}
