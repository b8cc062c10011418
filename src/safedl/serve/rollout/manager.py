"""``RolloutManager``: one per service. Routes a sticky share of keys to a canary (serve/rollout/lane.py), runs a
shadow next to the stable version, and drives the controller (serve/rollout/controller.py) that promotes the
canary step by step or rolls it back at once. Every decision is a row in the audit database's ``bundle_swaps``
table (trigger ``rollout``), a count in ``safedl_rollout_decisions_total``, a log line and, with the security
monitor on, a notification to its alert sinks."""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import torch

from safedl.serve.rollout.config import RolloutConfig, load_rollout
from safedl.serve.rollout.lane import Lane, key_share
from safedl.serve.rollout.metrics import RolloutMetrics
from safedl.serve.rollout.routing import Route
from safedl.serve.swap import SwapRefused, record_swap

log = logging.getLogger("safedl.serve.rollout")
MODES = ("canary", "shadow")
RETIRE_GRACE_S = 2.0  # a lane no key is routed to any more stops this long after the decision


class RolloutManager:
    def __init__(self, svc: Any):
        self.svc = svc
        self.metrics = RolloutMetrics(svc.metrics.registry)
        self.lane: Lane | None = None
        self.rules: RolloutConfig = load_rollout(None)  # what a canary without its own rules gets (--rollout)
        self.config: RolloutConfig = self.rules  # the running (or last) rollout's rules
        self.fraction = 0.0
        self.step = -1
        self.state: dict[str, Any] = {"state": "idle"}
        self.history: list[dict[str, Any]] = []
        self.traffic = [0, 0]  # the canary's (5xx, requests) since it started
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- the request path -----------------------------------------------------------------------------------
    def route(self, key_id: str | None) -> Route:
        """Where this key's request goes: the canary's lane for the keys in its share (holding a lease on it, so
        a decision meanwhile does not stop it under the request), else the stable version."""
        lane = self.lane
        if (lane is not None and lane.role == "canary" and key_id is not None and key_share(key_id) < self.fraction
                and lane.acquire()):
            return Route(self.svc, lane.batcher, lane.version, "canary", lease=lane)
        return Route(self.svc, self.svc.batcher, self.svc.bundle.version, "stable")

    def role_of(self, version: str | None) -> str:
        lane = self.lane
        return lane.role if lane is not None and version == lane.version else "stable"

    def record(self, version: str | None, *, status: int, latency_s: float, role: str | None = None) -> None:
        version = version or self.svc.bundle.version
        role = role or self.role_of(version)
        self.metrics.request(role, version, status=status, latency_s=latency_s)
        if role == "canary":
            with self._lock:
                self.traffic[1] += 1
                self.traffic[0] += int(status >= 500)

    def traffic_counts(self) -> tuple[int, int]:
        """The canary's (5xx answers, requests) since it started."""
        with self._lock:
            return self.traffic[0], self.traffic[1]

    def observe(self, x: torch.Tensor, d: dict) -> None:
        """An answered batch slice: per-version counts, and the shadow's comparison (queued)."""
        version = d.get("bundle_version") or self.svc.bundle.version
        role = self.role_of(version)
        self.metrics.answered(role, version, reasons=d["reasons"])
        lane = self.lane
        if lane is not None and lane.role == "shadow" and role == "stable":
            lane.shadow(x, d["labels"].clone(), d["rejected"].clone())

    # -- probe runs on the stable version -------------------------------------------------------------------
    def stable_decide(self, x: torch.Tensor) -> Any:
        """The stable version's full pipeline, holding its model lock (what a request would get)."""
        from safedl.serve.rollout.lane import tagged_decide

        svc = self.svc
        with svc.batcher.exclusive(), torch.inference_mode():
            return tagged_decide(svc.pipeline, x, svc.bundle.version)

    # -- control --------------------------------------------------------------------------------------------
    def begin(self, path: str, *, mode: str = "canary", config: RolloutConfig | None = None,
              fraction: float | None = None, ctx: dict | None = None, operator_path: bool = False) -> dict:
        """Load and check the bundle at ``path`` as the swap does, then serve it as a canary (controller
        started) or a shadow; raises SwapRefused (nothing changed)."""
        from safedl.serve.rollout.controller import Controller

        ctx = ctx or {}
        if mode not in MODES:
            raise SwapRefused(400, "bad_request", f"mode {mode!r}: choose canary or shadow")
        cfg = (config or self.rules).with_first_step(fraction)
        with self._lock:
            if self.state.get("state") == "progressing" or (self.lane is not None and self.lane.role == "shadow"):
                raise SwapRefused(409, "rollout_in_progress", "a canary or shadow is already running; abort it "
                                                              'first (POST /v1/admin/canary {"action": "abort"})')
            new = self.svc.swapper.check_bundle(path, operator_path=operator_path)
            if mode == "canary" and new.probes is None and self.svc.bundle.probes is None:
                raise SwapRefused(422, "no_probes", f"neither the stable bundle nor {path} has a probe set (export "
                                                    "them again): the rollout checks need one")
            lane = Lane(new, role=mode, max_batch=self.svc.config.max_batch,
                        max_wait_s=self.svc.config.max_wait_ms / 1000.0,
                        on_compare=lambda n, k: self.metrics.compared_with_stable(
                            "shadow", new.version, n=n, differ=k, source="traffic"),
                        on_drop=self.metrics.shadow_dropped.inc)
            lane.start()
            self.lane, self.config, self.traffic, self.step, self.fraction = lane, cfg, [0, 0], -1, 0.0
            self.history = []
            self.decide("start", ctx=ctx, state="progressing" if mode == "canary" else "shadowing", checks=[],
                        detail=f"{mode} {new.version} from {path}")
            if mode == "canary":
                self._stop.clear()
                self._thread = threading.Thread(target=Controller(self).run, name="safedl-rollout", daemon=True)
                self._thread.start()
        return self.status()

    def abort(self, *, ctx: dict | None = None) -> dict:
        """Stop the canary or shadow by hand (the stable version answers everything)."""
        with self._lock:
            if self.lane is None:
                raise SwapRefused(409, "no_rollout", "no canary or shadow is running")
            self.decide("abort", ctx=ctx or {}, state="aborted", checks=[], detail="aborted by an admin")
        return self.status()

    def set_fraction(self, fraction: float) -> None:
        self.fraction = float(fraction)
        self.metrics.fraction.set(self.fraction)

    def decide(self, decision: str, *, ctx: dict, state: str, checks: list[dict], detail: str | None = None,
               stop_lane: bool | None = None) -> dict:
        """Record one decision (audit row, metrics, log, alert sinks) and set the state; a final one stops the
        canary's lane."""
        lane = self.lane
        failed = [c for c in checks if not c["passed"] and not c.get("hold")]
        held = [c for c in checks if c.get("hold")]
        decisive = failed[0] if failed else (held[0] if held else None)
        entry = {"ts": time.time(), "decision": decision, "state": state, "step": self.step,
                 "fraction": self.fraction, "stable_version": self.svc.bundle.version,
                 "candidate_version": None if lane is None else lane.version,
                 "mode": None if lane is None else lane.role, "decided_by": decisive or detail, "checks": checks}
        self._audit(entry, ctx)
        self.metrics.decisions.labels(decision).inc()
        for c in failed:
            self.metrics.failed_checks.labels(c["check"]).inc()
        final = stop_lane or (stop_lane is None and state in ("promoted", "rolled_back", "aborted"))
        with self._lock:  # the final state and the lane's removal together: status() never shows one without the other
            self.state, self.history = entry, (self.history + [entry])[-50:]
            if final:
                self.set_fraction(0.0)
                self.lane = None
        level = logging.WARNING if decision in ("rollback", "abort") else logging.INFO
        log.log(level, "rollout %s: %s (%s)", decision, state, json.dumps(entry["decided_by"], default=str),
                extra={"event": "rollout_decision", "decision": decision, "state": state})
        self._notify(entry)
        if final and lane is not None:  # a request routed to it just before still gets its answer
            lane.retire(grace_s=RETIRE_GRACE_S)
        return entry

    def _audit(self, entry: dict, ctx: dict) -> None:
        audit = self.svc.audit
        row = {"ts": entry["ts"], "request_id": ctx.get("request_id"), "key_id": ctx.get("key_id"),
               "trigger": ctx.get("trigger", "rollout"), "action": f"canary_{entry['decision']}",
               "outcome": entry["state"], "from_version": entry["stable_version"],
               "to_version": entry["candidate_version"], "path": None,
               "detail": json.dumps({"step": entry["step"], "fraction": entry["fraction"],
                                     "decided_by": entry["decided_by"]}, default=str)}
        try:
            record_swap(audit.engine if audit.engine is not None else audit.target, row)
        except Exception as exc:  # noqa: BLE001 - logged; the decision (a rollback above all) stands
            log.error("rollout decision not audited: %s", exc, extra={"event": "rollout_audit_failed"})

    def _notify(self, entry: dict) -> None:
        monitor = self.svc.monitor
        if monitor is None or entry["decision"] not in ("rollback", "promote", "abort"):
            return
        from safedl.serve.monitor.routing import fingerprint

        by = entry["decided_by"] if isinstance(entry["decided_by"], dict) else {}
        rule = f"canary_{entry['decision']}"
        alert = {"alert_id": f"rollout-{int(entry['ts'] * 1000)}", "rule": rule, "key_id": None,
                 "severity": "critical" if entry["decision"] == "rollback" else "info", "state": "firing",
                 "started_at": entry["ts"], "resolved_at": None, "last_at": entry["ts"], "events": 1,
                 "value": by.get("bound"), "threshold": by.get("limit"), "metric": by.get("check", "rollout"),
                 "action": None, "bundle_version": entry["candidate_version"], "fingerprint": fingerprint(rule, None),
                 "rollout": {k: entry[k] for k in ("state", "step", "fraction", "stable_version",
                                                   "candidate_version", "decided_by")}}
        try:
            monitor.notifier.notify({"event": "alert_fired", "alert": alert})
        except Exception as exc:  # noqa: BLE001 - a sink problem never blocks the rollout
            log.error("rollout alert not sent: %s", exc)

    def status(self) -> dict:
        with self._lock:
            s = dict(self.state)
            lane = self.lane
            return {"state": s.get("state", "idle"), "mode": s.get("mode"), "fraction": self.fraction,
                    "step": self.step, "steps": list(self.config.steps), "interval_s": self.config.interval_s,
                    "stable_version": self.svc.bundle.version,
                    "candidate_version": None if lane is None else lane.version,
                    "last_decision": s.get("decision"), "decided_by": s.get("decided_by"),
                    "checks": s.get("checks", []), "history": [{k: h[k] for k in ("ts", "decision", "state",
                                                                                   "step", "fraction")}
                                                                for h in self.history]}

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30.0)
        lane, self.lane = self.lane, None
        if lane is not None:
            lane.stop()

    def stopping(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s; True once ``close`` was called."""
        return self._stop.wait(timeout)
