"""The rollout controller: at start (before the canary takes any traffic) and then every ``interval_s`` it runs
the probe set through the stable and the canary version's full pipelines itself (serve/rollout/checks.py), so a
decision never waits for user traffic to reach the canary. All checks pass: the next step (the last one, 100%,
promotes: the canary becomes the stable bundle through the audited swap of serve/swap.py). Any check fails:
rolled back at once (no key is routed to the canary any more). A check that holds (``non_inferiority`` mode, too little
evidence either way) keeps the canary at its step until the next interval, ``max_holds`` times in a row at most."""
from __future__ import annotations

import logging
from typing import Any

from safedl.serve.rollout.checks import evaluate, latencies, live_check, p99, run_probes
from safedl.serve.rollout.live import bundle_eps, live_robust, live_subset
from safedl.serve.swap import SwapRefused

log = logging.getLogger("safedl.serve.rollout")
CTX = {"trigger": "rollout"}


class Controller:
    def __init__(self, manager: Any):
        self.m = manager
        self.probe_calls = [0, 0]  # the canary's (failed, all) probe calls of the earlier evaluations


    def probes(self) -> Any:
        """The stable bundle's probe set when it has one (the trusted reference), else the canary's."""
        stable = self.m.svc.bundle.probes
        return stable if stable is not None else self.m.lane.bundle.probes

    def evaluate(self) -> list[dict]:
        """One evaluation of every check (the probe set through both versions)."""
        m, lane = self.m, self.m.lane
        ps = self.probes()
        stable = run_probes(m.stable_decide, ps)
        canary = run_probes(lane.decide_locked, ps)
        lat = latencies({"stable": m.stable_decide, "canary": lane.decide_locked}, ps)
        errors, calls = m.traffic_counts()  # user traffic and earlier probe calls: more evidence for the 5xx check
        checks = evaluate(ps, stable, canary, lat, cfg=m.config.checks,
                          traffic=(errors + self.probe_calls[0], calls + self.probe_calls[1]))
        self.probe_calls[0] += canary.errors
        self.probe_calls[1] += canary.calls + len(lat.get("canary", []))
        checks += self._live(ps)
        self._publish(ps, {"stable": (m.svc.bundle.version, stable), "canary": (lane.version, canary)}, lat)
        differ = int(((canary.labels != stable.labels) | (canary.rejected != stable.rejected)).sum())
        m.metrics.compared_with_stable("canary", lane.version, n=len(ps), differ=differ, source="probe")
        return checks

    def _live(self, ps: Any) -> list[dict]:
        """The live Square attack on both versions (the same seeded probes, eps, queries and seed)."""
        m, la = self.m, self.m.config.live_attack
        idx = live_subset(ps, n=la.n, seed=la.seed)
        if not la.n or not len(idx):
            return []
        eps = la.eps if la.eps is not None else bundle_eps(m.svc.bundle.manifest)
        kw = {"eps": eps, "queries_per_image": la.queries_per_image, "seed": la.seed}
        stable, _ = live_robust(m.stable_decide, ps, idx, **kw)
        canary, spent = live_robust(m.lane.decide_locked, ps, idx, **kw)
        for role, version, r in (("stable", m.svc.bundle.version, stable), ("canary", m.lane.version, canary)):
            m.metrics.probe.labels(role, version, "live_robust_accuracy").set(float(r.float().mean()))
        note = f"square linf eps={eps:g}, {la.queries_per_image} queries/image, seed {la.seed}; {spent} canary queries"
        return [live_check(stable, canary, m.config.checks, note=note)]

    def _publish(self, ps: Any, runs: dict, lat: dict) -> None:
        y, t = ps.y, ps.target
        clean, adv, trig = ps.mask("clean"), ps.mask("adversarial"), ps.mask("triggered") & (ps.y != ps.target)
        for role, (version, r) in runs.items():
            g = self.m.metrics.probe
            answered = ~r.rejected
            if int(clean.sum()):
                g.labels(role, version, "clean_accuracy").set(float((answered & (r.labels == y))[clean].float().mean()))
            if int(adv.sum()):
                g.labels(role, version, "robust_accuracy").set(
                    float((r.rejected | (r.labels == y))[adv].float().mean()))
            if int(trig.sum()):
                g.labels(role, version, "backdoor_asr").set(float((answered & (r.labels == t))[trig].float().mean()))
            if lat.get(role):
                g.labels(role, version, "p99_latency_seconds").set(p99(lat[role]))

    def run(self) -> None:
        """Evaluate now, then every interval: advance, promote or roll back (never raises)."""
        m, holds = self.m, 0
        try:
            while m.lane is not None and m.state.get("state") == "progressing":
                checks = self.evaluate()
                if m.lane is None or m.state.get("state") != "progressing":
                    return  # aborted meanwhile
                if any(not c["passed"] and not c.get("hold") for c in checks):
                    m.decide("rollback", ctx=CTX, state="rolled_back", checks=checks)
                    return
                if any(c.get("hold") for c in checks):
                    holds += 1
                    if holds > m.config.max_holds:
                        why = f"; rolled back after {holds - 1} holds (max_holds {m.config.max_holds})"
                        checks = [dict(c, note=c["note"] + why) if c.get("hold") else c for c in checks]
                        m.decide("rollback", ctx=CTX, state="rolled_back", checks=checks)
                        return
                    m.decide("hold", ctx=CTX, state="progressing", checks=checks)
                    if m.stopping(m.config.interval_s):
                        return
                    continue
                holds = 0
                if m.step + 1 >= len(m.config.steps):
                    self._promote(checks)
                    return
                m.step += 1
                m.set_fraction(m.config.steps[m.step] / 100.0)
                m.decide("progress", ctx=CTX, state="progressing", checks=checks,
                         detail=f"step {m.step + 1}/{len(m.config.steps)}: {m.config.steps[m.step]:g}% of keys")
                if m.stopping(m.config.interval_s):
                    return
        except Exception as exc:  # noqa: BLE001 - a controller bug must not leave a canary running unwatched
            log.exception("rollout controller failed; rolling the canary back")
            if m.lane is not None:
                m.decide("rollback", ctx=CTX, state="rolled_back", checks=[],
                         detail=f"controller failed: {type(exc).__name__}: {exc}")

    def _promote(self, checks: list[dict]) -> None:
        m, lane = self.m, self.m.lane
        try:
            m.svc.swapper.promote(lane.bundle, ctx=CTX)
        except SwapRefused as exc:
            m.decide("rollback", ctx=CTX, state="rolled_back", checks=checks,
                     detail=f"promotion refused: {exc.code}: {exc.message}")
            return
        m.set_fraction(0.0)
        m.decide("promote", ctx=CTX, state="promoted", checks=checks,
                 detail=f"promoted {lane.version} after {len(m.config.steps)} steps")

