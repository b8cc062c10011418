"""``SecurityMonitor``: the per-key query detectors, sliding windows, alert rules, alerts and automatic actions of
``safedl serve``.

The request path only enqueues (``observe``: a tuple into a bounded queue); one worker thread runs the detectors
(stateful k-NN, Chen et al. 2019; PRADA, Juuti et al. 2019; query volume), adds the request to its key's and the
global windows, evaluates the rules, and stores, notifies and acts on alerts. Alerts are deduplicated by
(rule, key), i.e. by fingerprint: while the condition holds, further matching requests only raise the alert's event
count; a rule with ``bands`` grades the alert's severity from its value and escalates it (notified) while firing.
What reaches the sinks (suppression of flapping, grouping across keys) is ``routing.Router``'s; keys on
``routing.allow_keys`` are never alerted or acted on.
"""
from __future__ import annotations

import base64
import hashlib
import io
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from safedl.serve.monitor.config import COMPARISONS, DRIFT_METRICS, RATES, SEVERITY_RANK, MonitorConfig, Rule
from safedl.serve.monitor.drift import DriftMonitor
from safedl.serve.monitor.metrics import MonitorMetrics
from safedl.serve.monitor.routing import Router, fingerprint
from safedl.serve.monitor.sinks import Notifier
from safedl.serve.monitor.store import AlertStore, KeyActions, new_alert_id, strongest
from safedl.serve.monitor.windows import Windows

if TYPE_CHECKING:
    from safedl.serve.keys import ApiKey

log = logging.getLogger("safedl.serve.monitor")
_STOP = object()
DETECTORS = ("stateful", "prada", "volume", "copycat", "sybil")
TOP_KEYS = 20


@dataclass
class _Key:
    name: str
    tier: str
    windows: Windows
    queries: int = 0
    rejected: int = 0
    flags: dict = field(default_factory=lambda: {d: None for d in DETECTORS})
    gallery_at: float = float("-inf")
    first_flag_at: float | None = None  # when a query detector first flagged the key (time to mitigate)


def _window_span(rules: list[Rule]) -> tuple[int, float]:
    counts = [r.window.count for r in rules if r.window.count]
    secs = [r.window.seconds for r in rules if r.window.seconds]
    return max(counts, default=0), max(secs, default=0.0)


def thumbnail(img: torch.Tensor) -> str:
    """A small PNG (longest side 32-64 px, nearest-neighbour) of a [C, H, W] image in [0, 1], base64."""
    from PIL import Image

    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    pil = Image.fromarray(arr[0].numpy(), "L") if arr.shape[0] == 1 else \
        Image.fromarray(arr[:3].permute(1, 2, 0).numpy(), "RGB")
    side = max(pil.size)
    scale = 64 / side if side > 64 else max(1, 32 // side)
    pil = pil.resize((max(1, round(pil.size[0] * scale)), max(1, round(pil.size[1] * scale))), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class SecurityMonitor:
    """Built by :func:`safedl.serve.monitor.build.build_monitor`; ``start()`` / ``close()`` run its threads."""

    def __init__(self, *, config: MonitorConfig, detectors: dict[str, Any], alerts: AlertStore, actions: KeyActions,
                 metrics: MonitorMetrics, notifier: Notifier, bundle_version: Callable[[], str],
                 clock: Callable[[], float] = time.time, drift: DriftMonitor | None = None,
                 bundle: Callable[[], Any] | None = None, history: Any = None,
                 misinformation_tau: float | None = None):
        self.config, self.detectors, self.alerts, self.actions = config, detectors, alerts, actions
        self.drift, self.bundle = drift, bundle
        self.history = history  # the detectors' shared history (serve/stores/history.py), closed with the monitor
        self.misinformation_tau = misinformation_tau  # answers of score-tier keys below it turn to misinformation
        self.metrics, self.notifier, self.bundle_version, self.clock = metrics, notifier, bundle_version, clock
        self.key_rules = [r for r in config.rules if r.scope == "key"]
        self.global_rules = [r for r in config.rules if r.scope == "global"]
        self._key_span = _window_span(self.key_rules)
        g_count, g_secs = _window_span(self.global_rules)
        self.global_windows = Windows(max_count=g_count, max_seconds=g_secs)
        self._keys: OrderedDict[str, _Key] = OrderedDict()
        self._firing: dict[tuple[str, str | None], dict] = {}
        self._pending: dict[tuple[str, str | None], float] = {}
        self._clearing: dict[tuple[str, str | None], float] = {}  # firing alerts whose condition stopped (clear_s)
        self._dirty: set[tuple[str, str | None]] = set()
        self._series: OrderedDict[int, list[int]] = OrderedDict()
        self._gallery: deque[dict] = deque(maxlen=config.gallery_size)
        self.on_flag: Callable[[list[dict]], None] | None = None  # the review queue's sink (serve/service.py)
        self._to_review: list[dict] = []
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=config.queue_size)
        self._queued_bytes = 0
        self._bytes_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._allow = frozenset(config.routing.allow_keys)
        self.router = Router(config.routing, notify=notifier.notify, public=self.public)

    # -- request path ------------------------------------------------------------------------------------------
    def observe(self, key: ApiKey, x: torch.Tensor, decision_slice: dict, *, request_id: str | None = None,
                ts: float | None = None, input_sha256: list[str] | None = None) -> None:
        """Queue one answered predict batch (the decoded pixels the model saw and its answers); never blocks. A
        batch that would overfill the queue (count or bytes) is dropped and counted in
        ``safedl_monitor_dropped_total`` (alert on it: unobserved traffic is unmonitored traffic)."""
        item = (key.key_id, key.name, key.tier, x, decision_slice["labels"], decision_slice["rejected"].tolist(),
                list(decision_slice["reasons"]), request_id, ts or self.clock(), input_sha256)
        size = x.element_size() * x.nelement()
        with self._bytes_lock:
            if self._queued_bytes + size > self.config.queue_mb * 2**20:
                self.metrics.dropped.inc()
                return
            self._queued_bytes += size
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._release(size)
            self.metrics.dropped.inc()

    def _release(self, size: int) -> None:
        with self._bytes_lock:
            self._queued_bytes -= size

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        stale = self.alerts.resolve_stale(now=self.clock())
        if stale:
            log.info("resolved %d alerts left firing by the previous run", stale, extra={"event": "alerts_stale"})
        self._thread = threading.Thread(target=self._run, name="safedl-monitor", daemon=True)
        self._thread.start()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued batch is processed (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._queue.unfinished_tasks

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(30.0)
            self._thread = None
        with self._lock:
            self._save_dirty()
            self.router.close()
        self.notifier.close()
        self.alerts.close()
        if self.history is not None:
            self.history.close()

    def _run(self) -> None:
        last_tick = time.monotonic()
        while True:
            try:
                item = self._queue.get(timeout=self.config.tick_s)
            except queue.Empty:
                item = None
            try:
                if item is _STOP:
                    return
                if item is not None:
                    t0 = time.perf_counter()
                    self._release(item[3].element_size() * item[3].nelement())
                    self._process(*item)
                    self._flush_review()
                    self.metrics.work.observe(time.perf_counter() - t0)
                if time.monotonic() - last_tick >= self.config.tick_s:
                    last_tick = time.monotonic()
                    self.tick()
            except Exception:  # a monitor bug must not stop monitoring
                log.exception("monitor: processing failed", extra={"event": "monitor_error"})
            finally:
                if item is not None:
                    self._queue.task_done()

    # -- worker ------------------------------------------------------------------------------------------------
    def _flush_review(self) -> None:
        """The flagged inputs of the last batch to the review queue (outside the lock: a database write)."""
        rows, self._to_review = self._to_review, []
        if rows and self.on_flag is not None:
            self.on_flag(rows)

    def _verdicts(self, key_id: str, x: torch.Tensor, labels: torch.Tensor) -> tuple[dict, Any]:
        out, glob = {}, None
        for name, det in self.detectors.items():
            out[name] = det.observe(key_id, x, labels=labels) if name == "prada" else det.observe(key_id, x)
            if name == "volume":
                glob = det.global_verdict()
        return out, glob

    def _process(self, key_id: str, name: str, tier: str, x: torch.Tensor, labels: torch.Tensor,
                 rejected: list, reasons: list, request_id: str | None, ts: float, sha: list | None) -> None:
        verdicts, glob = self._verdicts(key_id, x, labels)
        self._observe_drift(key_id, x)
        n, nrej = len(x), int(sum(rejected))
        ndet = sum(1 for r in reasons if r is not None and r.startswith("detector:"))
        flagged = [d for d, v in verdicts.items() if v.flagged]
        anomalous = max((v.n_flagged for v in verdicts.values()), default=0)
        per = {d: int(d in flagged) for d in DETECTORS}
        vec = (1, n, nrej, ndet, int(bool(flagged)), per["stateful"], per["prada"], per["volume"], anomalous,
               per["copycat"], per["sybil"])
        gvec = vec[:7] + (int(glob is not None and glob.flagged),) + vec[8:]
        now = self.clock()
        with self._lock:
            ks = self._key(key_id, name, tier)
            ks.queries += n
            ks.rejected += nrej
            for d in flagged:
                self._on_flag(ks, d, verdicts[d], x, key_id, request_id, ts, sha)
            for d, v in verdicts.items():
                if v.n_flagged:
                    self.metrics.anomalous.labels(d).inc(v.n_flagged)
            ks.windows.add(now, vec)
            self.global_windows.add(now, gvec)
            row = self._bucket(now)
            row[0], row[1], row[2] = row[0] + n, row[1] + nrej, row[2] + int(bool(flagged))
            if key_id not in self._allow and name not in self._allow:
                for rule in self.key_rules:
                    self._evaluate(rule, key_id, ks.windows, now, event=True)
            for rule in self.global_rules:
                self._evaluate(rule, None, self.global_windows, now, event=True)

    def _observe_drift(self, key_id: str, x: torch.Tensor) -> None:
        if self.drift is None or self.bundle is None:
            return
        try:
            self.drift.observe(key_id, x, bundle=self.bundle())
        except Exception:  # a drift failure must not stop the other detectors and rules
            log.exception("monitor: drift test failed", extra={"event": "drift_error"})

    def _key(self, key_id: str, name: str, tier: str) -> _Key:
        ks = self._keys.get(key_id)
        if ks is None:
            ks = self._keys[key_id] = _Key(name, tier, Windows(max_count=self._key_span[0],
                                                                max_seconds=self._key_span[1]))
            while len(self._keys) > self.config.max_keys:  # bounded: the least recently seen key goes first
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(key_id)
        ks.name, ks.tier = name, tier
        return ks

    def _on_flag(self, ks: _Key, det: str, v: Any, x: torch.Tensor, key_id: str, request_id: str | None,
                 ts: float, sha: list | None) -> None:
        first = ks.flags[det] is None
        if first:
            ks.flags[det] = v.first_at or v.n_seen
            ks.first_flag_at = ts if ks.first_flag_at is None else min(ks.first_flag_at, ts)
            self.metrics.flags.labels(det).inc()
            self.metrics.ttd.labels(det).observe(ks.flags[det])
            if det in ("prada", "copycat", "sybil"):
                self.metrics.extraction.inc()
            log.warning("key %s (%s) flagged by %s at query %d", ks.name, key_id, det, ks.flags[det],
                        extra={"event": "key_flagged", "key_id": key_id, "detector": det, "query": ks.flags[det]})
        if self.config.gallery_size and (first or ts - ks.gallery_at >= self.config.gallery_interval_s):
            ks.gallery_at = ts
            i = min(max((v.first_at or v.n_seen) - (v.n_seen - len(x)) - 1, 0), len(x) - 1)
            digest = sha[i] if sha else hashlib.sha256(x[i].numpy().tobytes()).hexdigest()
            reason = f"{det} (key query {v.first_at or v.n_seen}, score {v.score:.3g})"
            self._gallery.appendleft({"ts": ts, "key_id": key_id, "request_id": request_id, "reason": reason,
                                      "sha256": digest, "png_base64": thumbnail(x[i])})
            if self.on_flag is not None:  # as often as the gallery: a key's first flag, then once an interval
                self._to_review.append({"ts": ts, "key_id": key_id, "request_id": request_id or f"monitor-{digest}",
                                        "image_index": i, "input_sha256": digest, "reason": f"query_flag:{reason}",
                                        "detector_scores": {det: float(v.score)}, "rejected": False,
                                        "source": "flagged", "image": x[i].numpy()})

    def _bucket(self, now: float) -> list[int]:
        b = int(now // self.config.series_bucket_s) * self.config.series_bucket_s
        row = self._series.get(b)
        if row is None:
            row = self._series[b] = [0, 0, 0, 0]
            while self._series and next(iter(self._series)) < b - 3600:
                self._series.popitem(last=False)
        return row

    # -- rules and alerts --------------------------------------------------------------------------------------
    @staticmethod
    def value(rule: Rule, sums: dict[str, float]) -> float | None:
        """The rule's metric over its window's sums (None: a rate over fewer than ``min_queries`` images)."""
        if rule.metric in RATES:
            if sums["queries"] < max(1, rule.min_queries):
                return None
            return sums[RATES[rule.metric]] / sums["queries"]
        return float(sums[rule.metric])

    def _evaluate(self, rule: Rule, key_id: str | None, windows: Windows, now: float, *, event: bool) -> None:
        if rule.metric in DRIFT_METRICS:  # the p-value of the scope's latest drift test, not a window sum
            value = self.drift.latest_p(DRIFT_METRICS[rule.metric], key_id) if self.drift is not None else None
        else:
            value = self.value(rule, windows.sums(count=rule.window.count, seconds=rule.window.seconds, now=now))
        holds = value is not None and COMPARISONS[rule.comparison](value, float(rule.threshold))
        ident = (rule.name, key_id)
        alert = self._firing.get(ident)
        if holds:
            self._clearing.pop(ident, None)
        if holds and alert is not None:
            if event:
                alert["events"] += 1
            alert["value"], alert["last_at"] = value, now
            self._dirty.add(ident)
            self._escalate(rule, alert, rule.graded(value))
        elif holds:
            since = self._pending.setdefault(ident, now)
            if now - since >= rule.for_s:
                self._pending.pop(ident, None)
                self._fire(rule, key_id, value, now)
        else:
            self._pending.pop(ident, None)
            if alert is not None and now - self._clearing.setdefault(ident, now) >= rule.clear_s:
                self._clearing.pop(ident, None)
                self._resolve(rule, ident, alert, now)

    def _fire(self, rule: Rule, key_id: str | None, value: float, now: float) -> None:
        ident, severity = (rule.name, key_id), rule.graded(value)
        alert = self.router.reopen(fingerprint(rule.name, key_id), now)
        if alert is not None:  # it resolved less than routing.suppress_s ago: the same alert goes on, silently
            alert.update(state="firing", resolved_at=None, last_at=now, value=value, events=alert["events"] + 1)
            self._firing[ident] = alert
            self.alerts.upsert(alert)
            self.metrics.firing.labels(rule.name, alert["severity"]).inc()
            self.metrics.suppressed.labels(rule.name).inc()
            self._escalate(rule, alert, severity)
        else:
            alert = {"alert_id": new_alert_id(), "rule": rule.name, "severity": severity, "key_id": key_id,
                     "state": "firing", "started_at": now, "resolved_at": None, "last_at": now, "value": value,
                     "events": 1, "action": rule.action, "metric": rule.metric, "threshold": rule.threshold,
                     "bundle_version": self.bundle_version()}
            self._firing[ident] = alert
            self.alerts.upsert(alert)
            self.metrics.fired.labels(rule.name, severity).inc()
            self.metrics.firing.labels(rule.name, severity).inc()
            self._bucket(now)[3] += 1
            self.router.fired(alert, now)
        if rule.action is not None and key_id is not None:
            self._act(rule, key_id, alert, value, now)

    def _escalate(self, rule: Rule, alert: dict, severity: str) -> None:
        """Raise a firing alert's severity to ``severity`` if that is higher (never lowers it while firing)."""
        old = alert["severity"]
        if SEVERITY_RANK[severity] <= SEVERITY_RANK.get(old, 0):
            return
        alert["severity"] = severity
        self.alerts.upsert(alert)
        self.metrics.firing.labels(rule.name, old).dec()
        self.metrics.firing.labels(rule.name, severity).inc()
        self.metrics.escalations.labels(rule.name, severity).inc()
        log.warning("alert %s escalated: %s -> %s (value %.4g)", alert["alert_id"], old, severity, alert["value"],
                    extra={"event": "alert_escalated", "alert_id": alert["alert_id"], "severity": severity})
        self.router.escalated(alert)

    def _act(self, rule: Rule, key_id: str, alert: dict, value: float, now: float) -> None:
        if any(a.action == rule.action for a in self.actions.active(key_id)):
            return
        params = {"factor": self.config.actions.throttle_factor} if rule.action == "throttle" else {}
        self.actions.record(key_id=key_id, action=rule.action, alert_id=alert["alert_id"], params=params,
                            reason=f"rule {rule.name}: {rule.metric} {rule.comparison} {rule.threshold:g} "
                                   f"(value {value:.4g})")
        self.metrics.actions.labels(rule.action).inc()
        ks = self._keys.get(key_id)
        if ks is not None and ks.first_flag_at is not None:  # from the first query-detector flag to this action
            self.metrics.ttm.labels(rule.action).observe(max(0.0, now - ks.first_flag_at))
        log.warning("key %s: %s (alert %s, rule %s)", key_id, rule.action, alert["alert_id"], rule.name,
                    extra={"event": "key_action", "key_id": key_id, "action": rule.action,
                           "alert_id": alert["alert_id"]})

    def _resolve(self, rule: Rule, ident: tuple, alert: dict, now: float) -> None:
        alert.update(state="resolved", resolved_at=now, last_at=now)
        del self._firing[ident]
        self._dirty.discard(ident)
        self.alerts.upsert(alert)
        self.metrics.firing.labels(rule.name, alert["severity"]).dec()
        self.router.resolved(alert, now)

    def tick(self) -> None:
        """Re-evaluate what time alone can change (time windows, for-durations), then save changed alerts."""
        now = self.clock()
        with self._lock:
            for rule in self.global_rules:
                self._evaluate(rule, None, self.global_windows, now, event=False)
            waiting = {k for _, k in list(self._firing) + list(self._pending) if k is not None}
            for key_id in waiting:
                ks = self._keys.get(key_id)
                for rule in self.key_rules:
                    ident = (rule.name, key_id)
                    if ks is None:  # forgotten (max_keys): its windows are gone
                        self._pending.pop(ident, None)
                        self._clearing.pop(ident, None)
                        if ident in self._firing:
                            self._resolve(rule, ident, self._firing[ident], now)
                    elif ident in self._firing or ident in self._pending:
                        self._evaluate(rule, key_id, ks.windows, now, event=False)
            self._save_dirty()
            self.router.tick(now)

    def _save_dirty(self) -> None:
        for ident in list(self._dirty):
            if ident in self._firing:
                self.alerts.upsert(self._firing[ident])
        self._dirty.clear()

    @staticmethod
    def public(alert: dict) -> dict:
        """An alert as the summary and the sinks show it (its ``fingerprint`` included)."""
        out = {k: alert.get(k) for k in ("alert_id", "rule", "severity", "key_id", "state", "started_at",
                                          "resolved_at", "value", "events", "action", "metric", "threshold")}
        out["fingerprint"] = fingerprint(alert["rule"], alert["key_id"])
        return out

    # -- the summary -------------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """``GET /v1/monitor/summary``: alerts, top keys, the last hour's global series, recently flagged inputs."""
        now = self.clock()
        stored = self.alerts.recent(since=now - 3600)
        acts: dict[str, list] = {}
        for a in self.actions.active():
            acts.setdefault(a.key_id, []).append(a)
        with self._lock:
            live = {a["alert_id"]: a for a in self._firing.values()}
            alerts = [self.public(live.get(a["alert_id"], a)) for a in stored]
            top = sorted(self._keys.items(), key=lambda kv: -kv[1].queries)[:TOP_KEYS]
            keys = [{"key_id": k, "name": s.name, "queries": s.queries, "rejected": s.rejected, "tier": s.tier,
                     "action": strongest(acts.get(k, [])), "flags": dict(s.flags)} for k, s in top]
            bs = self.config.series_bucket_s
            last = int(now // bs) * bs
            ts = [last - i * bs for i in range(3600 // bs - 1, -1, -1)]
            rows = [self._series.get(t, [0, 0, 0, 0]) for t in ts]
            gallery = list(self._gallery)
        return {"now": now, "bundle_version": self.bundle_version(), "alerts": alerts, "keys": keys,
                "series": {"bucket_s": bs, "t": ts, "queries": [r[0] for r in rows], "rejected": [r[1] for r in rows],
                           "flags": [r[2] for r in rows], "alerts": [r[3] for r in rows]},
                "flagged_inputs": gallery, "drift": self.drift.snapshot() if self.drift is not None else None}
